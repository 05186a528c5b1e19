"""helpers/bench_serve.py without vLLM: the side-by-side table and the checks of a `vllm bench serve` result (the
run itself needs .venv-vllm and two servers: `make bench-serve`), and the stored run passes its own checks."""
import copy
import json

from helpers import bench_serve


def _run(output_len=32, n=4, ttft=20.0, itl=4.0, input_lens=(66, 64, 65, 64)):
    return {"completed": n, "failed": 0, "num_prompts": n, "total_input_tokens": sum(input_lens),
            "total_output_tokens": n * output_len, "input_lens": list(input_lens), "output_lens": [output_len] * n,
            "mean_ttft_ms": ttft, "median_ttft_ms": ttft, "p99_ttft_ms": 2 * ttft, "mean_tpot_ms": itl,
            "median_tpot_ms": itl, "mean_itl_ms": itl, "median_itl_ms": itl, "p99_itl_ms": 3 * itl,
            "mean_e2el_ms": ttft + 31 * itl, "output_throughput": 500.0, "request_throughput": 15.0,
            "chunks_per_request": 32.0}


def _result():
    return {"settings": {"num_prompts": 4, "output_len": 32},
            "runs": {"random": {"course": _run(ttft=31.25), "vllm": _run(ttft=22.5)},
                     "prefix_repetition": {"course": _run(itl=5.5), "vllm": _run(itl=3.75)}}}


def test_table_puts_each_server_beside_the_other():
    lines = bench_serve.table(_result()).splitlines()
    assert "random" in lines[0] and "prefix_repetition" in lines[0]
    assert lines[1].split() == ["course", "vLLM", "course", "vLLM"]
    ttft = next(line for line in lines if line.startswith("mean TTFT"))
    assert ttft.split()[-4:] == ["31.2", "22.5", "20.0", "20.0"]
    itl = next(line for line in lines if line.startswith("mean ITL"))
    assert itl.split()[-4:] == ["4.00", "4.00", "5.50", "3.75"]
    assert next(line for line in lines if line.startswith("completed")).split()[-4:] == ["4/0"] * 4


def test_checks_hold_on_a_good_run_and_fail_on_each_fault():
    assert all(ok for _, ok in bench_serve.checks(_result()))

    failed = copy.deepcopy(_result())
    failed["runs"]["random"]["course"].update(completed=3, failed=1)
    short = copy.deepcopy(_result())
    short["runs"]["prefix_repetition"]["vllm"]["output_lens"][2] = 31     # one request stopped early...
    short["runs"]["prefix_repetition"]["vllm"]["output_lens"][3] = 33     # ...another ran long: same total
    prompts = copy.deepcopy(_result())
    prompts["runs"]["random"]["course"]["input_lens"] = [64, 66, 65, 64]   # same total, other requests
    missing = copy.deepcopy(_result())
    del missing["runs"]["prefix_repetition"]["course"]
    for bad, expected in ((failed, "random: course answered"), (short, "prefix_repetition: vLLM generated"),
                          (prompts, "random: both servers counted"), (missing, "prefix_repetition: course was")):
        wrong = [statement for statement, ok in bench_serve.checks(bad) if not ok]
        assert len(wrong) == 1 and wrong[0].startswith(expected), wrong


def test_same_completion_recognises_vllms_leaked_prompt():
    prompt = "ab\ufffd"                                              # 2 + 3 bytes: 5 prompt tokens
    assert bench_serve.same_completion(" fox", " fox", 5) == "same"
    assert bench_serve.same_completion(" fox", prompt + " fox", 5) == "prompt + same"
    assert bench_serve.same_completion(" fox", prompt + " fox", 4) == "different"     # not the prompt's length
    assert bench_serve.same_completion(" fox", "ab\ufffd fog", 5) == "different"
    assert bench_serve.same_completion(" fox", "abcde fox", 5) == "different"       # no U+FFFD: no leak



def test_the_stored_run_passes_its_checks():
    stored = json.loads(bench_serve.RESULT_PATH.read_text())
    assert set(stored["runs"]) == set(bench_serve.DATASETS)
    assert all(set(runs) == set(bench_serve.SERVERS) for runs in stored["runs"].values())
    assert [statement for statement, ok in bench_serve.checks(stored) if not ok] == []
