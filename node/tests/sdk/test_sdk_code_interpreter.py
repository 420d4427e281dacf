"""The unmodified `e2b-code-interpreter` SDK (sync and async) against the
code-interpreter-v1 template, built on the session's node from
node/templates/code-interpreter-v1 exactly as `cargo xtask up` builds it.

What a user of E2B's code interpreter relies on: stateful contexts,
streamed stdout/stderr/results, rich results (PNG, chart data, DataFrame
data, JSON), errors with tracebacks, bash and TypeScript kernels, per-call
environment variables, the call's timeout interrupting the code (the
context keeps its state), pause/resume keeping the kernel's memory, and
bad input answered clearly.
"""

import base64
import os
import subprocess
import time

import httpx
import pytest

from conftest import REPO, RUNTIME, SANDMESH, module_sandbox

TEMPLATE = "code-interpreter-v1"
DOCKERFILE = REPO / "node/templates/code-interpreter-v1/Dockerfile"


@pytest.fixture(scope="session")
def interpreter_template(node):
    """Builds code-interpreter-v1 on the session's node (once)."""
    if RUNTIME != "gvisor":
        pytest.skip("template builds run on the gvisor runtime")
    url, key = node
    started = time.monotonic()
    out = subprocess.run(
        [SANDMESH, "template", "build", "--if-missing", "--url", url, "--api-key", key,
         "--alias", TEMPLATE, "--memory-mb", "1024", "-f", str(DOCKERFILE)],
        capture_output=True, text=True, timeout=900,
    )
    assert out.returncode == 0, f"building {TEMPLATE} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    print(f"{TEMPLATE} built in {time.monotonic() - started:.1f} s")
    return node


@pytest.fixture(scope="module")
def sbx(interpreter_template):
    from e2b_code_interpreter import Sandbox

    # The SDK's default template is code-interpreter-v1: no name given.
    assert Sandbox.default_template == TEMPLATE
    with module_sandbox(interpreter_template, cls=Sandbox) as box:
        yield box


def test_state_is_kept_and_the_result_is_the_value(sbx):
    assert sbx.get_info().template_id == TEMPLATE, "the sandbox shows the template it was created from"
    first = sbx.run_code("x = 40 + 2\nx")
    assert first.text == "42"
    assert first.error is None
    assert sbx.run_code("x + 1").text == "43"
    assert sbx.run_code("'a string'").text == "a string", "E2B drops a string repr's quotes"
    count = sbx.run_code("1").execution_count
    assert isinstance(count, int) and count >= 4


def test_output_is_streamed_to_callbacks_as_it_comes(sbx):
    seen = []
    execution = sbx.run_code(
        "import sys, time\n"
        "print('first', flush=True)\n"
        "time.sleep(1.5)\n"
        "print('oops', file=sys.stderr)\n"
        "display('shown')\n"
        "'last'",
        on_stdout=lambda m: seen.append(("out", m.line, time.monotonic())),
        on_stderr=lambda m: seen.append(("err", m.line, time.monotonic())),
        on_result=lambda r: seen.append(("result", r.text, time.monotonic())),
    )
    kinds = [(k, v) for k, v, _ in seen]
    assert kinds == [("out", "first\n"), ("err", "oops\n"), ("result", "shown"), ("result", "last")]
    assert seen[1][2] - seen[0][2] > 1.0, "stdout arrived only at the end, not streamed"
    assert execution.logs.stdout == ["first\n"]
    assert execution.logs.stderr == ["oops\n"]
    assert [r.is_main_result for r in execution.results] == [False, True]
    assert execution.text == "last"


def test_output_of_forked_children_and_subprocesses_comes_back(sbx):
    execution = sbx.run_code(
        "import os, subprocess\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    print('from the child', flush=True)\n"
        "    os._exit(0)\n"
        "os.waitpid(pid, 0)\n"
        "subprocess.run(['echo', 'from echo'])\n"
        "None"
    )
    assert execution.error is None, execution.error
    out = "".join(execution.logs.stdout)
    assert "from the child" in out and "from echo" in out, out


def test_an_exception_is_an_error_with_its_traceback(sbx):
    errors = []
    execution = sbx.run_code("def f():\n    return 1/0\nf()", on_error=errors.append)
    err = execution.error
    assert err.name == "ZeroDivisionError"
    assert err.value == "division by zero"
    assert "return 1/0" in err.traceback and "ZeroDivisionError" in err.traceback
    assert "\x1b[" not in err.traceback, "tracebacks are plain text, no terminal colours"
    assert errors and errors[0].name == "ZeroDivisionError"
    assert sbx.run_code("x").text == "42", "an error leaves the context's state"


def test_a_matplotlib_figure_is_a_png_with_chart_data(sbx):
    from e2b_code_interpreter.charts import ChartType

    execution = sbx.run_code(
        "import matplotlib.pyplot as plt\n"
        "plt.plot([1, 2, 3], [1, 4, 9], label='squares')\n"
        "plt.title('Squares')\n"
        "plt.xlabel('n')\n"
        "plt.show()"
    )
    assert execution.error is None, execution.error
    images = [r for r in execution.results if r.png]
    assert len(images) == 1
    png = base64.b64decode(images[0].png)
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
    chart = images[0].chart
    assert chart is not None, "no chart data (e2b/chart) with the figure"
    assert chart.type == ChartType.LINE
    assert chart.title == "Squares"
    assert chart.x_label == "n"
    assert chart.elements[0].label == "squares"
    assert [tuple(map(float, p)) for p in chart.elements[0].points] == [(1, 1), (2, 4), (3, 9)]

    bars = sbx.run_code(
        "fig, ax = plt.subplots()\nax.bar(['a', 'b'], [3, 5])\nax.set_title('Bars')\nplt.show()"
    )
    chart = next(r.chart for r in bars.results if r.chart)
    assert chart.type == ChartType.BAR
    assert [(e.label, float(e.value)) for e in chart.elements] == [("a", 3.0), ("b", 5.0)]


def test_dataframes_and_containers_have_data_and_json(sbx):
    df = sbx.run_code("import pandas as pd\npd.DataFrame({'a': [1, 2], 'b': ['x', 'y']})")
    assert df.error is None, df.error
    result = df.results[0]
    assert result.data == {"a": [1, 2], "b": ["x", "y"]}
    assert result.html and "<table" in result.html
    listed = sbx.run_code("[1, {'k': 2}]").results[0]
    assert listed.json == [1, {"k": 2}]


def test_contexts_isolate_state_and_restart_clears_it(sbx):
    ctx = sbx.create_code_context(cwd="/tmp")
    assert ctx.language == "python" and ctx.cwd == "/tmp"
    sbx.run_code("secret = 'in-context'", context=ctx)
    assert sbx.run_code("secret", context=ctx).text == "in-context"
    assert sbx.run_code("import os; os.getcwd()", context=ctx).text == "/tmp"
    other = sbx.run_code("secret")
    assert other.error is not None and other.error.name == "NameError", "the default context saw another context's state"
    assert ctx.id in [c.id for c in sbx.list_code_contexts()]

    sbx.restart_code_context(ctx)
    after = sbx.run_code("secret", context=ctx)
    assert after.error is not None and after.error.name == "NameError", "restart kept the state"
    assert sbx.run_code("1 + 1", context=ctx).text == "2"

    sbx.remove_code_context(ctx)
    assert ctx.id not in [c.id for c in sbx.list_code_contexts()]
    from e2b import NotFoundException

    with pytest.raises(NotFoundException, match="not found"):
        sbx.run_code("1", context=ctx)


def test_bash_and_typescript_kernels(sbx):
    bash = sbx.run_code("name=sandmesh\necho hello $name", language="bash")
    assert bash.error is None, bash.error
    assert "".join(bash.logs.stdout) == "hello sandmesh\n"
    assert "".join(sbx.run_code("echo $name", language="bash").logs.stdout) == "sandmesh\n"
    ts = sbx.run_code("const n: number = 20; n * 2 + 2", language="typescript")
    assert ts.error is None, ts.error
    assert ts.text == "42"
    js = sbx.run_code("console.log('from js')", language="js")
    assert "".join(js.logs.stdout) == "from js\n"


def test_envs_apply_to_one_call(interpreter_template):
    from e2b_code_interpreter import Sandbox

    with module_sandbox(interpreter_template, cls=Sandbox, envs={"FROM_CREATE": "sandbox"}) as box:
        code = "import os\n(os.environ.get('FROM_CREATE'), os.environ.get('PER_CALL'))"
        assert box.run_code(code, envs={"PER_CALL": "it's \"quoted\""}).text == "('sandbox', 'it\\'s \"quoted\"')"
        assert box.run_code(code).text == "('sandbox', None)", "a call's envs outlived the call"
        bash = box.run_code("echo $PER_CALL/$FROM_CREATE", language="bash", envs={"PER_CALL": "a b"})
        assert "".join(bash.logs.stdout) == "a b/sandbox\n"
        assert isinstance(box, Sandbox)


def test_the_timeout_interrupts_and_the_context_lives_on(sbx):
    from e2b import TimeoutException

    sbx.run_code("kept = 'still here'")
    started = time.monotonic()
    with pytest.raises(TimeoutException):
        sbx.run_code("import time\nwhile True:\n    time.sleep(0.05)", timeout=3)
    assert time.monotonic() - started < 20
    started = time.monotonic()
    after = sbx.run_code("kept", timeout=30)
    assert after.text == "still here", after
    assert time.monotonic() - started < 10, "the interrupted loop kept the context busy"


def test_a_dead_kernel_is_an_error_and_the_context_restarts(sbx):
    died = sbx.run_code("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")
    assert died.error is not None and died.error.name == "KernelDied", died
    assert "new kernel" in died.error.value
    assert sbx.run_code("21 * 2").text == "42", "the context did not come back"


def test_huge_output_is_bounded(sbx):
    execution = sbx.run_code("import sys\nfor i in range(400_000):\n    sys.stdout.write('x' * 99 + '\\n')\n'done'", timeout=240)
    printed = sum(len(s) for s in execution.logs.stdout)
    assert 30 * 2**20 <= printed <= 32 * 2**20, printed
    assert any("dropped" in s for s in execution.logs.stderr), execution.logs.stderr[:3]
    assert execution.text == "done"
    assert sbx.run_code("1").text == "1"


def test_bad_input_is_answered_clearly(sbx):
    from e2b import SandboxException
    from e2b_code_interpreter import Context

    with pytest.raises(SandboxException, match="unknown language 'cobol'.*python, bash"):
        sbx.run_code("1", language="cobol")
    with pytest.raises(SandboxException, match="unknown language"):
        sbx.create_code_context(language="cobol")
    from e2b import NotFoundException

    with pytest.raises(NotFoundException):
        sbx.run_code("1", context=Context("no-such-context", "python", "/home/user"))

    url = os.environ.get("E2B_SANDBOX_URL") or sbx.connection_config.sandbox_url
    headers = {"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "49999"}
    with httpx.Client(base_url=url, headers=headers, timeout=30) as http:
        bad = http.post("/execute", content=b"{not json", headers={"Content-Type": "application/json"})
        assert bad.status_code == 400 and bad.json()["code"] == 400
        if sbx._envd_access_token:
            wrong = http.post("/execute", json={"code": "1"}, headers={"X-Access-Token": "wrong"})
            assert wrong.status_code == 401, wrong.text
            assert "access token" in wrong.json()["message"]
        missing = http.post("/contexts/nope/restart")
        assert missing.status_code == 404 and "not found" in missing.json()["message"]


def test_pause_and_resume_keep_the_kernel_state(interpreter_template):
    from e2b_code_interpreter import Sandbox

    with module_sandbox(interpreter_template, cls=Sandbox) as box:
        box.run_code("import random\ndrawn = random.random()")
        before = box.run_code("drawn").text
        box.run_code("kept=bash-state", language="bash")
        assert box.pause() is True
        resumed = Sandbox.connect(box.sandbox_id, timeout=120)
        assert resumed.run_code("drawn").text == before
        assert resumed.run_code("drawn * 0").text == "0.0"
        assert "".join(resumed.run_code("echo $kept", language="bash").logs.stdout) == "bash-state\n"


def test_a_deno_context_refuses_pause_until_removed(interpreter_template):
    """Deno's kernel listens on TCP (no ZeroMQ ipc), which gVisor's save
    cannot hold: the pause is refused (409, the SDK's False), naming the way
    out, and the sandbox runs on; once the context is removed it works."""
    from e2b_code_interpreter import Sandbox

    url, key = interpreter_template
    with module_sandbox(interpreter_template, cls=Sandbox) as box:
        ctx = box.create_code_context(language="typescript")
        assert box.run_code("const a: number = 1; a", context=ctx).text == "1"
        # The SDK answers False to a refused pause (409); REST says why.
        assert box.pause() is False
        refused = httpx.post(f"{url}/sandboxes/{box.sandbox_id}/pause", headers={"X-API-Key": key}, timeout=120)
        assert refused.status_code == 409, refused.text
        assert "remove_code_context" in refused.json()["message"], refused.text
        assert box.run_code("1 + 1").text == "2", "the refused pause hurt the sandbox"
        box.remove_code_context(ctx)
        # Still refused for a moment (the connections to the killed kernel
        # close), then paused.
        for _ in range(20):
            if box.pause() is True:
                break
            time.sleep(0.5)
        else:
            raise AssertionError("the pause stayed refused after the context was removed")
        assert Sandbox.connect(box.sandbox_id, timeout=120).run_code("2 + 2").text == "4"


@pytest.mark.asyncio
async def test_async_sdk(interpreter_template):
    from e2b_code_interpreter import AsyncSandbox

    url, key = interpreter_template
    with pytest.MonkeyPatch.context() as mp:
        from conftest import point_sdk_at

        point_sdk_at(mp, url, key)
        box = await AsyncSandbox.create()
        try:
            assert (await box.run_code("x = 40 + 2\nx")).text == "42"
            lines = []

            async def on_stdout(m):
                lines.append(m.line)

            await box.run_code("print(x)", on_stdout=on_stdout)
            assert lines == ["42\n"]
            ctx = await box.create_code_context()
            assert (await box.run_code("x", context=ctx)).error.name == "NameError"
            failed = await box.run_code("1/0")
            assert failed.error.name == "ZeroDivisionError"
            assert "".join((await box.run_code("echo hi", language="bash")).logs.stdout) == "hi\n"
            await box.remove_code_context(ctx.id)
        finally:
            await box.kill()
