"""Experiments as data: YAML configs and their grids (config), the kind → runner table (kinds), what
a run of each kind does (runners, studies, relearn: Table 1 per registry defense), searched cells of
a config's ``search:`` block (search), resumable run directories (run) and the demo (demo).
"""
