"""rtsmap: map retrogressive thaw slumps across the Arctic, year by year.

The code lives in three folders of the checkout, installed as one namespace:
``rtsmap.pipeline`` (the stages, no torch), ``rtsmap.models`` (the network, training, export;
the only place that imports torch) and ``rtsmap.workflows`` (CLI, configuration, Dask).
``rtsmap.contract`` holds what ``models`` and ``pipeline`` must agree on, torch-free.
"""

__version__ = "0.1.0"
