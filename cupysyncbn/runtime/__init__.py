"""The process runtime: what the launcher and the machine say, and what ends a stuck job.

* :mod:`.env`: every environment variable the package reads (the only module that reads it);
* :mod:`.placement`: ``set_device``/``get_device``, the rank -> GPU rule;
* :mod:`.watchdog`: the collective watchdog, the abort hook, ``abort_job``.
"""
