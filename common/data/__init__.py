"""Data: from raw downloads or the user's own images to the datasets the methods train and evaluate on.

One module per job, each importing only those above it in this list (no cycle):

* ``registry``: the dataset names this toolkit knows (four benchmarks, the demo) and their protocols;
* ``images``: opening an image file (the one opener every reader uses) and the image file extensions;
* ``normalize``: the fused ToTensor + Normalize that ends every preset;
* ``files``: reading annotation text and writing only inside a dataset folder;
* ``index``: the processed JSON index: where it lives, reading it (once per process), own data's protocol;
* ``archives``: readers of the four benchmarks' raw annotation files;
* ``demo``: the synthetic demo dataset, written in CUB's raw layout;
* ``verify``: decoding every image once (and writing crops) while an index is built;
* ``own``: the user's own images from a CSV or a folder tree;
* ``prepare``: building indexes, ``ensure_dataset`` for the scripts, and ``data_utils.py``'s command line;
* ``datasets``: ``RetrievalDataset`` over an index, label spaces and the evaluation protocol.
"""
