"""CLI commands, each a module-level function (importable and testable alone); each module's
`register(app)` adds its commands and groups to the `ctrlnet` app."""
