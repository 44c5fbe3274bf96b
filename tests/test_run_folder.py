"""The run folder's ``gradwatch.json`` when several processes write one ``log_dir`` at once."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

RUNS_PER_PROCESS = 25

# Each process opens and closes RUNS_PER_PROCESS runs in the folder as fast as it can, once
# both have started (the file `go` appears), so that their read-update-write cycles overlap.
WRITER = textwrap.dedent("""
    import os, sys, time
    from gradwatch.sinks import jsonl
    folder, go, mode = sys.argv[1:]
    if mode == "lock-file":
        jsonl._fcntl = None
    print("ready", flush=True)
    while not os.path.exists(go):
        time.sleep(0.001)
    for _ in range({runs}):
        sink = jsonl.JsonlSink(folder)
        sink.open()
        sink.close(None)
        print(sink.run_id, flush=True)
""").format(runs=RUNS_PER_PROCESS)


@pytest.mark.parametrize("mode", ["fcntl", "lock-file"])
def test_two_processes_writing_one_folder_lose_no_run(tmp_path, mode):
    if mode == "fcntl":
        pytest.importorskip("fcntl")
    folder, go = tmp_path / "run", tmp_path / "go"
    folder.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(folder), str(go), mode],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready", p.stderr.read()
    go.touch()
    outs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs]
    written = [line for out, _ in outs for line in out.split()]
    assert len(written) == len(set(written)) == 2 * RUNS_PER_PROCESS
    meta = json.loads((folder / "gradwatch.json").read_text())
    assert sorted(r["run"] for r in meta["runs"]) == sorted(written)
    assert meta["run"] in written
    # Only the finished files are left: no temporary file, no held lock.
    assert sorted(p.name for p in folder.iterdir()) == ["findings.jsonl", "gradwatch.json"]
