"""style.py batch on a tiny net: isolation, resume, local workers, Dask, worker crashes, Ctrl-C, scripts/batch.sh."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from style_transfer.batch import Outcome, Task, backends, batch_main, read_manifest, run_task
from style_transfer.batch.cli import build_parser, job_defaults
from style_transfer.batch.manifest import Job
from style_transfer.batch.worker import cpu_count
from style_transfer.options import FINGERPRINTED
from tests import tinynets

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    folder = tmp_path_factory.mktemp("net")
    proto, weights = tinynets.write_net(folder, "v2", "input_shape")
    return ["--prototxt", str(proto), "--weights", str(weights), "--style-layers", "conv1,conv2",
            "--content-layers", "conv3", "-g", "-1", "-l", "24", "-n", "3"]


def _images(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = {"s1": folder / "s1.png", "s2": folder / "s2.jpg", "c1": folder / "c1.png", "c2": folder / "c2.JPG"}
    Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(paths["s1"])
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(paths["s2"], format="JPEG")
    yy, xx = np.mgrid[0:48, 0:64]
    Image.fromarray(np.stack([xx * 4, yy * 5, (xx + yy) * 2], -1).astype(np.uint8)).save(paths["c1"])
    Image.fromarray(np.stack([yy * 5, xx * 3, 255 - xx * 2], -1).astype(np.uint8)).save(paths["c2"], format="JPEG")
    return paths


def _manifest(path: Path, rows: list[dict[str, str]]) -> Path:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _summary(manifest: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(manifest.with_name(manifest.stem + ".summary.json").read_text())
    return data


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


GOOD_ROWS = [  # two inits, a seeded noise start, a two-style blend
    {"style": "s1.png", "content": "c1.png", "output": "out/a.png", "init": "", "seed": ""},
    {"style": "s2.jpg", "content": "c2.JPG", "output": "out/b.png", "init": "1", "seed": "7"},
    {"style": "s1.png;s2.jpg", "content": "c1.png", "output": "out/c.png", "init": "mixed", "seed": ""},
    {"style": "s2.jpg", "content": "c1.png", "output": "out/d.png", "init": "0.5", "seed": "3"},
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, net: list[str]) -> dict[str, np.ndarray]:
    """One local worker with one torch thread: what the other runs must reproduce exactly."""
    folder = tmp_path_factory.mktemp("reference")
    _images(folder)
    manifest = _manifest(folder / "jobs.csv", GOOD_ROWS)
    assert batch_main([str(manifest), *net, "--workers", "1", "--threads", "1"]) == 0
    return {row["output"]: _pixels(folder / row["output"]) for row in GOOD_ROWS}


def _fresh_loads_per_worker(folder: Path) -> dict[str, int]:
    loads: dict[str, int] = {}
    for report in (folder / "out").glob("*.json"):
        data = json.loads(report.read_text())
        loads[data["worker"]] = loads.get(data["worker"], 0) + int(data.get("model_loaded_fresh", False))
    return loads


# ------------------------------------------------------------------------------------------ isolation, resume


def test_bad_image_fails_its_job_only_and_rerun_resumes(tmp_path: Path, net: list[str],
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    paths = _images(tmp_path)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"this is not a JPEG")
    manifest = _manifest(tmp_path / "jobs.csv", [
        {"style": "s1.png", "content": "c1.png", "output": "out/a.png"},
        {"style": "s2.jpg", "content": "c2.JPG", "output": "out/b.png"},
        {"style": "s1.png", "content": "bad.jpg", "output": "out/c.png"},
        {"style": "s2.jpg", "content": "c1.png", "output": "out/d.png"},
    ])
    args = [str(manifest), *net, "--workers", "1"]

    assert batch_main(args) == 1  # 1: some job failed
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("*.png")) == ["a.png", "b.png", "d.png"]
    summary = _summary(manifest)
    assert summary["counts"] == {"ok": 3, "failed": 1}
    failed = [j for j in summary["jobs"] if j["status"] == "failed"]
    assert [j["line"] for j in failed] == [4]
    assert "bad.jpg" in failed[0]["error"] and "\n" not in failed[0]["error"]
    table = capsys.readouterr().out
    assert "failed" in table and "bad.jpg" in table and "3 ok, 1 failed" in table
    assert json.loads((out / "c.png.json").read_text())["status"] == "failed"
    # One worker process ran the three jobs and read the net once.
    assert list(_fresh_loads_per_worker(tmp_path).values()) == [1]

    # Fix the bad image and run again: the three finished jobs are skipped (images and reports untouched), the
    # failed one runs.
    done = {name: (out / name).stat().st_mtime_ns for name in ("a.png", "b.png", "d.png")}
    reports = {name: (out / f"{name}.json").read_text() for name in done}
    Image.open(paths["c2"]).save(bad, format="JPEG")
    assert batch_main(args) == 0
    summary = _summary(manifest)
    assert summary["counts"] == {"ok": 1, "skipped": 3}
    assert [j["line"] for j in summary["jobs"] if j["status"] == "ok"] == [4]
    assert {name: (out / name).stat().st_mtime_ns for name in done} == done
    assert {name: (out / f"{name}.json").read_text() for name in done} == reports
    assert (out / "c.png").is_file() and json.loads((out / "c.png.json").read_text())["status"] == "ok"


def test_output_without_ok_report_is_not_finished(tmp_path: Path, net: list[str]) -> None:
    """A crash between writing the image and its report must not count as done: the job runs again."""
    _images(tmp_path)
    manifest = _manifest(tmp_path / "jobs.csv", [GOOD_ROWS[0]])
    (tmp_path / "out").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "out" / "a.png")
    jobs = read_manifest(manifest, job_defaults(build_parser().parse_args(["x", *net])))
    assert not jobs[0].is_finished()
    report = tmp_path / "out" / "a.png.json"
    report.write_text(json.dumps({"status": "ok", "fingerprint": jobs[0].fingerprint}))
    assert jobs[0].is_finished()
    report.write_text(json.dumps({"status": "ok", "fingerprint": "another job"}))
    assert not jobs[0].is_finished()
    report.write_text("{truncated")
    assert not jobs[0].is_finished()


# ------------------------------------------------------------------------------------------------ manifests


def _defaults(*argv: str) -> dict[str, Any]:
    return job_defaults(build_parser().parse_args(["m.csv", *argv]))


def test_manifest_columns_paths_and_overrides(tmp_path: Path) -> None:
    manifest = tmp_path / "sub" / "jobs.csv"
    manifest.parent.mkdir()
    manifest.write_text("Style,content,output,Num-Iters,ratio,style_weights,original_colors,gpu\n"
                        "a.png;b.png,c.jpg,out/x.jpg,7,,1;3,yes,-1\n"
                        "# a comment\n"
                        "\n"
                        "a.png,/abs/c.jpg,y.jpg,,5e3,,,\n")
    jobs = read_manifest(manifest, _defaults("-n", "20", "-r", "1e5", "--weights", "w.caffemodel"))
    first, second = jobs
    base = manifest.parent
    assert first.styles == [base / "a.png", base / "b.png"] and first.content == base / "c.jpg"
    assert first.output == base / "out" / "x.jpg" and first.report_path == base / "out" / "x.jpg.json"
    assert first.options["num_iters"] == 7 and first.options["ratio"] == "1e5"
    assert first.options["style_weights"] == [1.0, 3.0] and first.options["original_colors"] is True
    assert first.options["gpu"] == -1
    assert first.options["weights"] == str(Path.cwd() / "w.caffemodel")  # command line: relative to the cwd
    assert (second.line, second.content, second.options["num_iters"]) == (5, Path("/abs/c.jpg"), 20)
    assert second.options["ratio"] == "5e3" and first.problem is None and second.problem is None


def test_fingerprint_follows_what_a_job_computes(tmp_path: Path) -> None:
    manifest = tmp_path / "jobs.csv"

    def job(extra: str = "", header: str = "") -> Job:
        manifest.write_text(f"style,content,output{header}\na.png,c.png,o.png{extra}\n")
        return read_manifest(manifest, _defaults())[0]

    plain = job().fingerprint
    assert job(",0", ",gpu").fingerprint == plain  # where it runs is not what it computes
    assert job(",9", ",seed").fingerprint != plain
    assert job(",2", ",scales").fingerprint != plain
    half = job(",bf16", ",precision")
    assert half.options["precision"] == "bf16" and half.fingerprint != plain
    assert job(",fp8", ",precision").problem is not None
    # options.py's table says what counts: where a job runs and what it prints, nothing it computes.
    # --max-memory only decides how an evaluation is tiled, and tiled evaluation is exact.
    assert set(job().options) - FINGERPRINTED == {"gpu", "models_dir", "max_pixels", "max_memory", "verbose",
                                                  "download_missing"}


def test_fingerprint_is_the_one_earlier_versions_wrote(tmp_path: Path) -> None:
    """Jobs finished before the option table existed stay finished: the same job gives the same fingerprint."""
    manifest = tmp_path / "jobs.csv"
    manifest.write_text("style,content,output,seed,init,style_weights,original_colors,ratio,length\n"
                        "/a/s.png;/a/t.png,/a/c.png,/a/o.png,7,/a/i.png,1;3,yes,5e3,100\n"
                        "/a/s.png,/a/c.png,/a/p.png,,,,,,\n")
    jobs = read_manifest(manifest, _defaults("--tv-weight", "2", "--scales", "2"))
    assert [j.fingerprint for j in jobs] == ["d209edc1053d92e0", "d7179f01f891b267"]


@pytest.mark.parametrize(("text", "message"), [
    ("style,content\na,b\n", "missing column(s) output"),
    ("style,content,output,colour\na,b,c,d\n", "unknown column(s) 'colour'"),
    ("style,content,output,seed,seed\na,b,c,1,2\n", "given twice: seed"),
    ("style,content,output\n", "no jobs"),
    ("style,content,output\na,b,same.png\nc,d,same.png\n", "both write"),
])
def test_manifest_errors_stop_the_batch(tmp_path: Path, text: str, message: str,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    manifest = tmp_path / "jobs.csv"
    manifest.write_text(text)
    assert batch_main([str(manifest)]) == 2
    assert message in capsys.readouterr().err


def test_bad_row_fails_its_job_before_running(tmp_path: Path) -> None:
    manifest = tmp_path / "jobs.csv"
    manifest.write_text("style,content,output,num_iters,pooling,original_colors\n"
                        "a,b,c.png,abc,,\n"
                        "a,b,d.png,,median,\n"
                        "a,b,e.png,,,maybe\n"
                        ",b,f.png,,,\n"
                        "a,b,g.png,5,max,no\n")
    jobs = read_manifest(manifest, _defaults())
    problems = [j.problem for j in jobs]
    assert problems[0] is not None and "line 2" in problems[0] and "needs a whole number" in problems[0]
    assert problems[1] is not None and "--pooling must be one of avg, max, got 'median'" in problems[1]
    assert problems[2] is not None and "--original-colors must be yes or no" in problems[2]
    assert problems[3] is not None and "no style image" in problems[3]
    assert problems[4] is None and jobs[4].options["pooling"] == "max"


def test_options_that_are_columns_or_extra_files_are_refused(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    refused = {"-s/--style-img": ["-s", "x.png", "y.png"], "-c/--content-img": ["-c", "x.png"],
               "-o/--output": ["-o", "x.png"], "--report": ["--report", "r.json"],
               "--save-every": ["--save-every", "5"], "--animation": ["--animation", "a.gif"],
               "--download": ["--download", "vgg16"], "--mirror": ["--mirror", "m"]}
    for label, argv in refused.items():
        assert batch_main([str(tmp_path / "m.csv"), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"style.py batch: error: {label} is not an option of style.py batch"), err
        assert "\n" not in err
        column = {"-s/--style-img": "style", "-c/--content-img": "content", "-o/--output": "output"}.get(label)
        assert (f"; it is the manifest column {column!r}" in err) == (column is not None)
    assert batch_main([str(tmp_path / "m.csv"), "--workers", "2", "--dask-scheduler", "tcp://x:1"]) == 2


# ------------------------------------------------------------------------------- workers, model cache, Dask


def test_a_job_is_the_library_run_with_its_options(tmp_path: Path, net: list[str]) -> None:
    """What a manifest row asks for reaches the run: colour matching, original colours, init and seed."""
    import torch

    from style_transfer import images
    from style_transfer.transfer import StyleTransfer

    paths = _images(tmp_path)
    manifest = _manifest(tmp_path / "jobs.csv", [{"style": "s2.jpg", "content": "c1.png", "output": "out/a.png",
                                                 "init": "1", "seed": "5", "color_match": "meancov",
                                                 "original_colors": "yes", "tv_weight": "0.5"}])
    assert batch_main([str(manifest), *net, "--workers", "1", "--threads", "1"]) == 0

    options = dict(zip(net[::2], net[1::2], strict=True))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        st = StyleTransfer(prototxt=options["--prototxt"], weights=options["--weights"], gpu=-1,
                           style_layers=options["--style-layers"], content_layers=options["--content-layers"])
        result = st.stylize(images.load_image(paths["c1"]), [images.load_image(paths["s2"])], length=24,
                            num_iters=3, init="1", seed=5, color_match="meancov", original_colors=True,
                            tv_weight=0.5).run()
    finally:
        torch.set_num_threads(threads)
    images.save_image(tmp_path / "library.png", result.rgb)
    assert np.array_equal(_pixels(tmp_path / "out" / "a.png"), _pixels(tmp_path / "library.png"))
    report = json.loads((tmp_path / "out" / "a.png.json").read_text())
    assert report["seed"] == 5 and report["iterations"] == result.iterations == 3
    assert report["loss"] == pytest.approx(result.report["loss"], rel=1e-6)


def test_two_workers_give_the_same_images(tmp_path: Path, net: list[str], reference: dict[str, np.ndarray]) -> None:
    _images(tmp_path)
    manifest = _manifest(tmp_path / "jobs.csv", GOOD_ROWS)
    assert batch_main([str(manifest), *net, "--workers", "2"]) == 0
    for name, pixels in reference.items():
        assert np.array_equal(_pixels(tmp_path / name), pixels), name
    reports = [json.loads((tmp_path / f"{row['output']}.json").read_text()) for row in GOOD_ROWS]
    assert {r["threads"] for r in reports} == {max(1, cpu_count() // 2)}  # the cores shared by the workers
    loads = _fresh_loads_per_worker(tmp_path)
    assert all(n == 1 for n in loads.values()) and 1 <= len(loads) <= 2


def test_dask_local_cluster_gives_the_same_images(tmp_path: Path, net: list[str],
                                                  reference: dict[str, np.ndarray]) -> None:
    distributed = pytest.importorskip("distributed")
    _images(tmp_path)
    manifest = _manifest(tmp_path / "jobs.csv", GOOD_ROWS)
    with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None,
                                  host="127.0.0.1") as cluster:
        assert batch_main([str(manifest), *net, "--dask-scheduler", cluster.scheduler_address]) == 0
    for name, pixels in reference.items():
        assert np.array_equal(_pixels(tmp_path / name), pixels), name
    loads = _fresh_loads_per_worker(tmp_path)
    assert all(n == 1 for n in loads.values()) and 1 <= len(loads) <= 2
    assert _summary(manifest)["mode"].startswith("dask tcp://127.0.0.1:")


def test_unreachable_dask_scheduler_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("distributed")
    import dask

    _images(tmp_path)
    manifest = _manifest(tmp_path / "jobs.csv", [GOOD_ROWS[0]])
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        code = batch_main([str(manifest), "--dask-scheduler", "tcp://127.0.0.1:9", "-g", "-1"])
    assert code == 2
    assert "cannot reach the Dask scheduler at tcp://127.0.0.1:9" in capsys.readouterr().err


def crash_on_job_2(task: Task) -> Outcome:
    """Stands in for a segfault or the OOM killer; spawned workers import it from here."""
    if task.job == 2:
        os._exit(3)
    return run_task(task)


def test_a_dying_worker_fails_only_its_job(tmp_path: Path, net: list[str]) -> None:
    _images(tmp_path)
    manifest = _manifest(tmp_path / "jobs.csv", GOOD_ROWS[:3])
    assert batch_main([str(manifest), *net, "--workers", "2"], task_function=crash_on_job_2) == 1
    jobs = {j["job"]: j for j in _summary(manifest)["jobs"]}
    assert jobs[2]["status"] == "failed" and "worker process died" in jobs[2]["error"]
    assert jobs[1]["status"] == jobs[3]["status"] == "ok"
    assert (tmp_path / "out" / "a.png").is_file() and (tmp_path / "out" / "c.png").is_file()


def slow_task(task: Task) -> Outcome:
    time.sleep(0.5)
    return run_task(task)


def test_ctrl_c_stops_submitting_and_reports(tmp_path: Path, net: list[str]) -> None:
    _images(tmp_path)
    rows = [{"style": "s1.png", "content": "c1.png", "output": f"out/{i}.png"} for i in range(6)]
    manifest = _manifest(tmp_path / "jobs.csv", rows)
    code = ("import sys; from style_transfer.batch import batch_main; from tests.batch.test_batch import slow_task; "
            "sys.exit(batch_main(sys.argv[1:], task_function=slow_task))")
    proc = subprocess.Popen([sys.executable, "-c", code, str(manifest), *net, "--workers", "1"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stderr is not None
    for line in proc.stderr:
        if "[1/6] ok" in line:
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "starting no more jobs" in err
    summary = _summary(manifest)
    assert summary["interrupted"] is True and summary["exit_code"] == 130
    assert summary["counts"]["ok"] in (1, 2) and summary["counts"]["not run"] >= 4
    assert "not run" in out


# ----------------------------------------------------------------------------------------------- batch.sh


def test_batch_sh_runs_every_pair(tmp_path: Path, net: list[str]) -> None:
    paths = _images(tmp_path / "in")
    (tmp_path / "styles").mkdir()
    (tmp_path / "contents").mkdir()
    for key in ("s1", "s2"):
        paths[key].rename(tmp_path / "styles" / paths[key].name)
    for key in ("c1", "c2"):
        paths[key].rename(tmp_path / "contents" / paths[key].name)
    (tmp_path / "styles" / "notes.txt").write_text("not an image")
    env = {**os.environ, "PYTHON": sys.executable}
    res = subprocess.run(["bash", str(ROOT / "scripts" / "batch.sh"), "styles", "contents", "results", *net],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    results = tmp_path / "results"
    assert sorted(p.name for p in results.glob("*.jpg")) == ["c1-s1.jpg", "c1-s2.jpg", "c2-s1.jpg", "c2-s2.jpg"]
    assert Image.open(results / "c1-s2.jpg").size == (24, 18)
    assert (results / "manifest.csv").is_file() and (results / "manifest.summary.json").is_file()
    # A second run finds everything done.
    res = subprocess.run(["bash", str(ROOT / "scripts" / "batch.sh"), "styles", "contents", "results", *net],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "4 finished before, 0 to run" in res.stderr


def test_python_dash_m_runs_the_batch(tmp_path: Path) -> None:
    _images(tmp_path)
    manifest = _manifest(tmp_path / "jobs.csv", [GOOD_ROWS[0]])
    res = subprocess.run([sys.executable, "-m", "style_transfer.batch", str(manifest), "--dry-run"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr
    assert "out/a.png  would run" in res.stdout


def always_crash(task: Any) -> Outcome:
    os._exit(3)


def test_a_job_submitted_to_a_pool_that_just_broke_counts_as_died() -> None:
    from concurrent.futures import wait as wait_futures

    backend = backends.LocalBackend(1, 1, always_crash)
    try:
        first = backend.submit(object())  # type: ignore[arg-type]
        wait_futures([first], timeout=120)
        assert isinstance(backend.outcome(first), backends.Died)
        # The driver has not looked yet: the next submission meets the broken pool and must not raise.
        second = backend.submit(object())  # type: ignore[arg-type]
        assert isinstance(backend.outcome(second), backends.Died)
    finally:
        backend.recover()
        backend.pool.shutdown(wait=True)


def sleep_after_marking(marker: Path) -> Outcome:
    marker.write_text(str(os.getpid()))
    time.sleep(120)
    return Outcome("ok")


def test_abandoning_ends_the_running_worker_processes(tmp_path: Path) -> None:
    """The second Ctrl-C: a running job's process is ended, not waited for."""
    from concurrent.futures import wait as wait_futures

    backend = backends.LocalBackend(1, 1, sleep_after_marking)  # type: ignore[arg-type]
    marker = tmp_path / "running"
    future = backend.submit(marker)  # type: ignore[arg-type]
    deadline = time.monotonic() + 120
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "the job never started"
    started = time.monotonic()
    backend.abandon([future])
    assert time.monotonic() - started < 60
    wait_futures([future], timeout=30)
    assert isinstance(backend.outcome(future), backends.Died)
    with pytest.raises(ProcessLookupError):
        os.kill(int(marker.read_text()), 0)
