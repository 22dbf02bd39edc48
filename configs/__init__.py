"""Config files of varjax (installed as the package ``varjax.configs``; see ``varjax.config``)."""
