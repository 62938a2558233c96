import subprocess
import sys
import time

import pytest

from batchseg.errors import EXIT_LOCKED, LockedError
from batchseg.io.lock import build_lock


def test_second_holder_fails_at_once(tmp_path):
    with build_lock(tmp_path):
        start = time.perf_counter()
        with pytest.raises(LockedError) as info:
            with build_lock(tmp_path):
                pass
        assert time.perf_counter() - start < 2
        assert "another batchseg run" in str(info.value)
        assert info.value.exit_code == EXIT_LOCKED == 75
    with build_lock(tmp_path):  # released: can be taken again
        pass


def test_lock_of_a_killed_process_is_released(tmp_path):
    code = f"from batchseg.io.lock import build_lock\nfrom pathlib import Path\nimport os\nwith build_lock(Path({str(tmp_path)!r})):\n    os._exit(9)\n"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 9
    with build_lock(tmp_path):
        pass


def test_the_holding_process_may_take_its_lock_again_others_may_not(tmp_path):
    code = f"from batchseg.io.lock import build_lock\nfrom pathlib import Path\nwith build_lock(Path({str(tmp_path)!r})):\n    pass\n"
    with build_lock(tmp_path, allow_nested=True):
        with build_lock(tmp_path):  # nested: `batchseg build` calls the stages under its lock
            pass
        other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert other.returncode == 1 and "LockedError" in other.stderr  # still held after the nested exit
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
