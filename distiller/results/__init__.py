"""The results collector: run directories into the paper tables, our mean +- std beside the published numbers
(``scripts/collect_results.py`` is its command line).

:mod:`.published` holds the published numbers and their recipes, :mod:`.runs` reads run directories,
:mod:`.settings` says where a run departed from its cell's published settings (the NOT_PUBLISHED_SETTINGS flag),
:mod:`.tables` groups and compares the runs (:func:`~distiller.results.tables.collect`); :mod:`.writers` writes the
Markdown, CSV and figure.
"""
