"""The audit log service: every tenant's tamper-evident, append-only record of changes."""
