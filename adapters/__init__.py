"""Fine-tuning adapters, one module per method (installed as ``s2l_plugin.adapters``)."""
