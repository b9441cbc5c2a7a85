"""results.jsonl → report.md, no training code: the page (page), its attack and curvature / utility
sections (attack, measure), markdown helpers (markdown) and PNG figures (plots).
"""
