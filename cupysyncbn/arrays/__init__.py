"""The array vocabulary, with no communication and no state.

* :mod:`.formats`: ``data_format`` names, channel axis, canonical views;
* :mod:`.dtypes`: accepted input dtypes and the compute dtype;
* :mod:`.devices`: the one device parser, moving arrays between devices;
* :mod:`.dlpack`: any ``__dlpack__`` array in, the caller's library out.
"""
