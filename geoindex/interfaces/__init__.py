"""What users touch: the ``geoindex`` command, the HTTP service, output formats and maps."""
