"""Subcommands of the ``ldn`` CLI (see ``timm_ldn.cli``)."""
