"""Defenses behind one plug-in point: registry (the Defense protocol, entries with capability flags),
catalog (the built-ins), data, features, spectral, unlearning, representation, tar, immunization,
and run (defend a source into an output directory with a card and manifest)."""
