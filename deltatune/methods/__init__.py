"""The built-in methods, one module per method name; the registry discovers and imports them on first lookup.
Modules named `_*` hold plumbing shared by several methods (they register nothing)."""
