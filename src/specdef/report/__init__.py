"""results.jsonl → report.md, no training code: the page (page), its sections (attack, measure,
informed, native, optimizers, table1), blocks in hand-written pages (blocks), markdown and PNG plots.
"""
