"""One thread for calls too small to share.

Waking Numba's TBB workers for a parallel kernel costs tens of microseconds when they have gone
to sleep between calls (they have, whenever Python spends a few microseconds between kernels):
a 1x1x8x8 convolution took ~62 us on 2 threads and ~36 us on one. Below ``SERIAL_WORK``
multiply-adds the kernels run on the calling thread alone. Results do not depend on the thread
count (every output is reduced by one task in a fixed order), so this changes timing only.
"""
import contextlib

import numba

# ~1M multiply-adds: a few hundred microseconds on one core, where a second thread starts to pay
SERIAL_WORK = 1 << 20


@contextlib.contextmanager
def threads_for(work):
    """Context for kernel calls doing ``work`` multiply-adds (or window visits): one thread if
    the work is small, else the caller's setting. ``numba.set_num_threads`` is per calling
    thread, so concurrent callers do not see each other's setting."""
    if work >= SERIAL_WORK:
        yield
        return
    threads = numba.get_num_threads()
    if threads == 1:
        yield
        return
    numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(threads)
