"""sae-rollback: turns alerts into durable, verified rollbacks of SAE change orders."""

__version__ = "0.1.0"
