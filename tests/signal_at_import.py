"""
Run a script so that a signal arrives as it first imports a module: a fixed point of its start,
however fast or loaded the machine (a delay would land in the imports on one machine and after
them on another). The process signals itself from inside the import, as a Ctrl-C typed at that
moment would. tests/test_bad_inputs.py's how='import:MODULE:SIGNAL'.
    python tests/signal_at_import.py MODULE SIGNAL script.py [args ...]
"""
import os
import runpy
import signal
import sys

module, signum = sys.argv[1], signal.Signals[sys.argv[2]]


class SignalAt:
    """A finder that finds nothing: it only sees the first import of module go by."""

    def find_spec(self, name, path=None, target=None):
        if name == module:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signum)


sys.meta_path.insert(0, SignalAt())
sys.argv = sys.argv[3:]
sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))  # as `python script.py` has it
runpy.run_path(sys.argv[0], run_name='__main__')
