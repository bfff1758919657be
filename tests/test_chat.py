"""`ifprune chat`: the selection policies and per-mask KV caches of ChatSession, and the real
CLI driven in a pseudo-terminal."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import ifprune_mlx as ifp
from ifprune_mlx import bundle, testing
from ifprune_mlx.chat import ChatSession, mask_key
from ifprune_mlx.cli import app

_SCRIPT = Path(sys.executable).with_name("ifprune")  # the installed entry point
IFPRUNE = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "ifprune_mlx.cli"]
TASK = "Write a Python function that reverses a list."
OTHER = "Translate the sentence into French, please."


@pytest.fixture(scope="module")
def engine(endless_bundle):
    return ifp.load(endless_bundle)


def turn(session, text):
    """Send a message; return the generated token ids and the first response."""
    responses = list(session.send(text))
    return [r.token for r in responses], responses[0]


def test_per_task_keeps_one_selection_and_prefills_only_new_tokens(engine):
    session = ChatSession(engine, policy="per-task", max_tokens=6)
    calls = engine.selector.calls
    for text in (TASK + " (per-task)", OTHER, "and now in Spanish"):
        _, first = turn(session, text)
        assert first.prompt_tokens == session.last.prefill_tokens
    t1, t2, t3 = session.turns
    assert t1.mask == t2.mask == t3.mask != "dense"
    assert session.task == TASK + " (per-task)"
    assert (t1.selected, t2.selected, t3.selected) == (True, False, False)
    assert engine.selector.calls == calls + 1
    assert not t1.cache_hit and t1.reused_tokens == 0
    for i, t in ((1, t2), (2, t3)):  # the conversation so far is cached: only new tokens are fed
        assert t.cache_hit and t.reused_tokens > 0 and t.swaps == 0
        full = len(engine.prompt_tokens(session.messages[: 2 * i + 1]))
        assert t.reused_tokens + t.prefill_tokens == full
    assert t2.reused_tokens >= t1.prefill_tokens
    assert list(session.cached_masks()) == [t1.mask]


def test_the_training_free_selector_in_chat(engine):
    session = ChatSession(engine, policy="per-task", selector="activations", max_tokens=4)
    activations = engine.get_selector("activations")
    calls = activations.calls
    turn(session, TASK + " (activations)")
    turn(session, OTHER)
    assert activations.calls == calls + 1 and session.last.mask == session.turns[0].mask
    assert session.mask.selection.source == "activations" and session.settings()["selector"] == "activations"
    session.set_selector("predictor")
    session.reselect()
    turn(session, "a task only this test selects")
    assert session.mask.selection.source == "predictor"
    with pytest.raises(ifp.SelectionError, match="unknown selector"):
        session.set_selector("nope")


def test_a_dense_prefill_answers_as_generate_does_and_keeps_its_own_caches(engine):
    """prefill "dense": each turn's new tokens run on every channel, the answer on the mask;
    the first turn equals engine.generate with the same setting, the second reuses the
    conversation's dense-prefilled cache, and switching to "pruned" starts a cache of its own."""
    session = ChatSession(engine, policy="per-task", max_tokens=6, prefill="dense")
    assert session.prefills_dense() and session.settings()["prefill"] == "dense"
    first, _ = turn(session, TASK + " (dense prefill)")
    t1 = session.last
    assert t1.dense_prefill and not t1.cache_hit
    engine.apply(session.mask.selection)
    try:
        want = engine.generate(session.messages[:1], max_tokens=6, prefill="dense")
        pruned = engine.generate(session.messages[:1], max_tokens=6, prefill="pruned")
    finally:
        engine.apply("auto")
    assert engine.tokenizer.decode(first) == want != pruned
    turn(session, OTHER)
    assert session.last.cache_hit and session.last.dense_prefill and session.last.mask == t1.mask
    session.set_prefill("pruned")
    turn(session, "and now in Spanish")
    assert not session.last.cache_hit and not session.last.dense_prefill and session.last.mask == t1.mask
    assert set(session.cached_masks()) == {t1.mask, "dense-prefill " + t1.mask}
    with pytest.raises(ifp.SelectionError, match="prefill must be one of pruned, dense"):
        session.set_prefill("full")


def test_conversation_state_is_not_a_constructor_argument(engine):
    """messages, turns and masks are the session's own state: passing them is an error, not
    silently dropped."""
    with pytest.raises(TypeError):
        ChatSession(engine, messages=[{"role": "user", "content": "hi"}])
    session = ChatSession(engine, system="Be brief.")
    assert session.messages == [{"role": "system", "content": "Be brief."}]
    assert session.mask is None and session.previous is None and session.selector is engine.selector


def test_per_turn_selects_every_message_and_a_new_mask_prefills_everything(engine):
    session = ChatSession(engine, policy="per-turn", max_tokens=6)
    turn(session, TASK)
    turn(session, OTHER)
    t1, t2 = session.turns
    assert t2.selected and t2.mask != t1.mask
    assert session.previous.key == t1.mask and session.task == OTHER
    assert not t2.cache_hit and t2.reused_tokens == 0
    assert t2.prefill_tokens == len(engine.prompt_tokens(session.messages[:3]))
    assert min(session.mask.selection.overlap(session.previous.selection)) < 1.0


def test_a_returning_mask_reuses_its_prompt_cache_and_matches_a_fresh_prefill(engine):
    session = ChatSession(engine, policy="per-turn", max_tokens=8)
    turn(session, TASK)
    turn(session, OTHER)
    tokens, first = turn(session, TASK)
    t1, t2, t3 = session.turns
    assert t3.mask == t1.mask != t2.mask
    full = len(engine.prompt_tokens(session.messages[:5]))
    assert t3.cache_hit and t3.reused_tokens >= t1.prefill_tokens
    assert first.prompt_tokens == t3.prefill_tokens == full - t3.reused_tokens < full
    # The reused keys/values are those a fresh prefill under this mask computes.
    engine.apply(session.mask.selection)
    fresh = [r.token for r in engine.stream_responses(session.messages[:5], max_tokens=8)]
    assert fresh == tokens


def test_caches_are_bounded_lru(engine):
    session = ChatSession(engine, policy="per-turn", max_tokens=2, max_caches=2)
    for text in (TASK, OTHER, "Sort these numbers: 5 3 9 1."):
        turn(session, text)
    keys = [t.mask for t in session.turns]
    assert len(set(keys)) == 3
    assert list(session.cached_masks()) == keys[1:]


def test_off_is_dense_and_density_reselects_the_task(engine):
    session = ChatSession(engine, policy="off", max_tokens=3)
    turn(session, TASK)
    assert session.last.mask == "dense" and engine.applied is None
    assert session.last.kept_counts == [engine.d_ffn] * engine.n_layers and session.last.density == 1.0
    session.set_policy("per-task")
    turn(session, TASK)
    assert session.set_density(0.5) == 128
    turn(session, OTHER)
    a, b = session.turns[1:]
    assert a.kept_counts == [96, 96] and b.kept_counts == [128, 128]
    assert b.mask == mask_key(engine.select(TASK, 0.5)) and not b.cache_hit
    session.reselect()
    turn(session, OTHER)
    assert session.task == OTHER and session.last.mask == mask_key(engine.select(OTHER, 0.5))
    with pytest.raises(ifp.SelectionError):
        session.set_density(1.5)
    with pytest.raises(ifp.SelectionError):
        session.set_policy("sometimes")


def test_an_interrupted_turn_keeps_its_partial_answer_and_its_cache(engine):
    session = ChatSession(engine, max_tokens=50)
    responses = session.send(TASK)
    partial = "".join(next(responses).text for _ in range(3))
    responses.close()
    assert session.last.finish_reason == "interrupted" and session.last.generation_tokens == 3
    assert session.messages[-1] == {"role": "assistant", "content": partial}
    (key, held), = session.cached_masks().items()
    assert held == session.last.prefill_tokens + 3
    tokens, _ = turn(session, OTHER)
    assert session.last.cache_hit and session.last.reused_tokens > 0
    engine.apply(session.mask.selection)
    fresh = [r.token for r in engine.stream_responses(session.messages[:3], max_tokens=50)]
    assert fresh == tokens


def test_transcript_and_reset(engine, tmp_path):
    session = ChatSession(engine, system="You are terse.", max_tokens=3, seed=1)
    turn(session, TASK)
    data = json.loads(session.save(tmp_path / "t.json").read_text())
    assert set(data) == {"model", "settings", "messages", "turns"}
    assert [m["role"] for m in data["messages"]] == ["system", "user", "assistant"]
    assert data["settings"]["policy"] == "per-task" and data["settings"]["seed"] == 1
    assert data["turns"][0]["prefill_tokens"] > 0 and data["turns"][0]["finish_reason"] == "length"
    session.reset()
    assert session.messages == [{"role": "system", "content": "You are terse."}]
    assert session.turns == [] and session.cached_masks() == {} and session.task is None


# -- the CLI ---------------------------------------------------------------------------

def test_cli_user_mistakes_are_one_line(tmp_path, bundle_dir, monkeypatch):
    runner = CliRunner()
    monkeypatch.setenv("IFPRUNE_MODEL", str(tmp_path / "none"))
    cases = [
        (["chat", str(tmp_path / "missing")], "no such model folder or file"),
        (["chat", str(bundle_dir), "--density", "2"], "density must be in (0, 1]"),
        (["chat", str(bundle_dir), "--policy", "often"], "--policy must be one of"),
        (["chat"], "none: no such model folder or file"),
    ]
    for args, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 1, (args, result.output)
        assert message in result.output and "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1


def _env(tmp_path):
    return dict(os.environ, IFPRUNE_HISTORY=str(tmp_path / "history"), TERM="xterm",
                COLUMNS="120", NO_COLOR="1")


def test_cli_reads_piped_lines(endless_bundle, tmp_path):
    script = f"{TASK}\n/density 0.5\n/nope\n/save {tmp_path / 'chat.json'}\n"
    result = subprocess.run([*IFPRUNE, "chat", str(endless_bundle), "-m", "5"], input=script,
                            capture_output=True, text=True, env=_env(tmp_path), timeout=60)
    assert result.returncode == 0, result.stderr
    assert "keeps 128 of 256 channels" in result.stdout
    assert "error: unknown command /nope" in result.stderr and "Traceback" not in result.stderr
    saved = json.loads((tmp_path / "chat.json").read_text())
    assert saved["turns"][0]["generation_tokens"] == 5


def test_cli_in_a_terminal(endless_bundle, tmp_path):
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(IFPRUNE[0], [*IFPRUNE[1:], "chat", str(endless_bundle), "-m", "12"], env=_env(tmp_path),
                          encoding="utf-8", codec_errors="replace", timeout=30, dimensions=(40, 120))
    screen = child.logfile_read = io.StringIO()
    try:
        child.expect_exact(f"loading {Path(endless_bundle).name}")  # the progress bar
        child.expect("/help for commands")
        child.expect_exact(">>> ")
        child.sendintr()                           # Ctrl-C at the prompt: a new prompt
        child.expect_exact("Ctrl-D or /quit to exit")
        child.expect_exact(">>> ")
        child.sendline(TASK)                       # ask: the answer streams and ends
        child.expect_exact(">>> ")
        answer = child.before.split(TASK, 1)[-1].strip()
        assert answer and "[interrupted]" not in answer
        child.sendline("/density 0.5")
        child.expect_exact("keeps 128 of 256 channels per layer")
        child.expect_exact(">>> ")
        child.sendline(OTHER)
        child.expect_exact(">>> ")
        child.sendline("/stats")
        child.expect(r"select +[\d.]+ ms \(predictor ran\)")
        child.expect(r"prefill +\d+ tokens \(new cache for this mask\)")
        child.expect(r"first token +[\d.]+ ms")
        child.expect(r"decode +12 tokens, [\d.]+ tok/s \(length\)")
        child.expect_exact("kept         128/256 channels per layer (density 0.50)")
        child.expect(r"memory +peak [\d.]+ MB")
        child.expect_exact(">>> ")
        child.sendline("/mask")
        child.expect(r"density 0\.50; overlap with previous mask")
        child.expect(r" +0 +128/256 +[01]\.\d\d")
        child.expect(r" +1 +128/256 +[01]\.\d\d")
        child.expect(r"mean overlap [01]\.\d\d")
        child.expect_exact(">>> ")
        child.sendline("/selector activations")   # the training-free selector, then a new mask
        child.expect_exact("selector: activations; the next message selects a new mask")
        child.expect_exact(">>> ")
        child.sendline(TASK)
        child.expect_exact(">>> ")
        child.sendline("/stats")
        child.expect(r"select +[\d.]+ ms \(activations ran\)")
        child.expect_exact(">>> ")
        child.sendline("/max-tokens 100000")      # a long answer, stopped by Ctrl-C
        child.expect_exact(">>> ")
        child.sendline("Once upon a time")
        child.expect_exact("Once upon a time")
        child.expect(r"\S{20}")                    # streaming: text is on screen mid-answer
        child.sendintr()
        child.expect_exact("[interrupted]", timeout=10)
        child.expect_exact(">>> ")
        child.send("/sta\t\r")                    # Tab completes slash commands
        child.expect(r"decode +\d+ tokens, [\d.]+ tok/s \(interrupted\)")
        child.expect_exact(">>> ")
        child.sendline("/frobnicate")
        child.expect_exact("error: unknown command /frobnicate; /help lists the commands")
        child.expect_exact(">>> ")
        child.sendline("/density 3")
        child.expect_exact("error: density must be in (0, 1]")
        child.expect_exact(">>> ")
        child.sendline("/save " + str(tmp_path / "chat.json"))
        child.expect_exact("saved 8 messages, 4 turns")
        child.expect_exact(">>> ")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, screen.getvalue()[-2000:]
    assert "Traceback" not in screen.getvalue()
    saved = json.loads((tmp_path / "chat.json").read_text())
    assert [t["finish_reason"] for t in saved["turns"]] == ["length", "length", "length", "interrupted"]
    assert saved["settings"]["selector"] == "activations"
    assert (tmp_path / "history").read_text().count("/density") == 2  # readline history


def test_cli_dense_in_a_terminal_and_ctrl_d(endless_bundle, tmp_path):
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(IFPRUNE[0], [*IFPRUNE[1:], "chat", str(endless_bundle), "--policy", "off",
                                       "--system", "Be brief.", "-m", "3"],
                          env=_env(tmp_path), encoding="utf-8", codec_errors="replace", timeout=30)
    screen = child.logfile_read = io.StringIO()
    try:
        child.expect_exact("dense (no selection)")
        child.expect_exact(">>> ")
        child.sendline(TASK)
        child.expect_exact(">>> ")
        child.sendline("/stats")
        child.expect_exact("dense (policy off): no selection")
        child.expect_exact("kept         256/256 channels per layer (density 1.00)")
        child.expect_exact(">>> ")
        child.sendline("/mask")
        child.expect_exact("dense: all 256 channels in each of 2 layers")
        child.expect_exact(">>> ")
        child.sendeof()                            # Ctrl-D exits cleanly
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, screen.getvalue()[-2000:]
    assert "Traceback" not in screen.getvalue()


SHIPPED = Path(__file__).parents[1] / "examples" / "train_tiny" / "checkpoint"


@pytest.mark.skipif(not (SHIPPED / "llm").exists(), reason="the demo checkpoint is not trained yet")
def test_the_demo_model_chats_like_it_answers_single_prompts(tmp_path):
    """On the trained demo model: the first turn answers as generate() does, and a later turn
    answered from the reused cache equals a fresh prefill of the whole conversation."""
    result = CliRunner().invoke(app, ["convert", str(SHIPPED), str(tmp_path / "demo")])
    assert result.exit_code == 0, result.output
    engine = ifp.load(tmp_path / "demo")
    for policy in ("per-task", "per-turn"):
        session = ChatSession(engine, policy=policy, max_tokens=16)
        first = "".join(r.text for r in session.send("Reverse the letters: k e p l"))
        assert first == engine.generate("Reverse the letters: k e p l", max_tokens=16)
        tokens, _ = turn(session, "Add the numbers: 3 4 5")
        same_mask = session.turns[0].mask == session.turns[1].mask
        assert session.last.cache_hit == same_mask == (session.last.reused_tokens > 0)
        assert same_mask or policy == "per-turn"
        engine.apply(session.mask.selection)
        assert [r.token for r in engine.stream_responses(session.messages[:3], max_tokens=16)] == tokens
        engine.apply("auto")


def test_an_empty_answer_is_shown_as_such(bundle_dir, capsys, monkeypatch):
    from ifprune_mlx.chat_cli import ChatREPL

    session = ChatSession(ifp.load(bundle_dir))
    repl = ChatREPL(session, interactive=False)

    def nothing_but_whitespace(text):
        yield from ()

    monkeypatch.setattr(session, "send", nothing_but_whitespace)
    repl.answer("hello")
    assert "[empty answer" in capsys.readouterr().out


def test_the_prefill_command_sets_the_sessions_and_stats_show_it(bundle_dir, capsys):
    from ifprune_mlx.chat_cli import ChatREPL, UsageError

    session = ChatSession(ifp.load(bundle_dir), max_tokens=3)
    repl = ChatREPL(session, interactive=False)
    with pytest.raises(UsageError, match=r"usage: /prefill pruned\|dense \(now pruned\)"):
        repl.command("/prefill")
    repl.command("/prefill dense")
    assert session.prefill == "dense" and "prefill: dense" in capsys.readouterr().out
    repl.answer("hello")
    repl.command("/stats")
    stats = capsys.readouterr().out
    assert " dense (new cache for this mask)" in stats
    assert f"{session.last.mask[:8]} dense-prefilled (" in stats
