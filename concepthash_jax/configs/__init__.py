"""The config files, installed with the package.

One file per setting; each defines `get_config(arg=None)`. `base.py` declares
every key with its default and the reason for it; the dataset files, `paper.py`
and `synthetic.py` import it and override what differs. The command-line tools
take them by name (`concepthash-train --config=cub:nbit=32`) or by path
(`python launch.py --config=configs/cub.py`, `configs/` being a link to this
folder in a checkout). docs/method.md §4 lists the switches between the
released recipe and the paper.
"""
