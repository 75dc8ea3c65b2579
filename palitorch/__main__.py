import os
import sys

from palitorch.entry import main

code = main()
ddp = sys.modules.get("palitorch.train.ddp")
if ddp is not None and ddp.JOINED:
    # This process ran in a torchrun process group: its work is done, its files written and closed, and the group
    # destroyed. Leave without the interpreter's own teardown, where a gloo thread left joinable has (rarely, under
    # load) aborted a finished process ("terminate called without an active exception"), which torchrun then
    # reports as the run failing.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said
            pass
    os._exit(code)
sys.exit(code)
