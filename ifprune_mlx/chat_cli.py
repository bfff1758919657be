"""`ifprune chat`: the terminal around a ChatSession (input, slash commands, streaming, Ctrl-C).

Ctrl-C during an answer stops it after the current token and returns to the prompt (the
partial answer stays in the conversation); a second Ctrl-C interrupts at once. Ctrl-C at the
prompt clears the line; Ctrl-D or /quit exits. Line editing and history come from readline
(history in ~/.ifprune_history, or $IFPRUNE_HISTORY). With stdin not a terminal, lines are
read plainly, so `echo hi | ifprune chat MODEL` answers and exits.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Callable, Optional

import typer

from .bundle import PREFILLS
from .chat import DENSE, POLICIES, ChatSession, split_cache_key
from .console import (DENSITY_OPTION, MAX_DENSITY_OPTION, MODEL_ARGUMENT, PREFILL_OPTION, RESIDENT_OPTION,
                      SEED_OPTION, TEMP_OPTION, TOP_P_OPTION, checked_prefill, density_origin, error_line, fail,
                      friendly_errors, open_model, resident_options)
from .errors import IFPruneError
from .resident import describe
from .selectors import check_density, check_sampling

HELP = """\
/help              this list
/density D         keep a fraction D of the FFN channels, e.g. /density 0.5
/reselect          the next message selects a new mask (per-task: it becomes the task)
/dense             run the full model (again: back to pruning)
/policy POLICY     when to select a mask: per-task | per-turn | off
/selector NAME     predictor (trained) | activations (training-free)
/prefill P         the trained predictor's prompts run on: pruned (kept channels) | dense (all)
/max-tokens N      most tokens per answer
/stats             costs of the last turn: select, apply, first token, tok/s, memory
/mask              kept channels per layer, overlap with the previous mask
/reset             forget the conversation (settings stay)
/save FILE         write the transcript (messages, settings, per-turn stats) as JSON
/quit              exit (or Ctrl-D)
Ctrl-C stops an answer and keeps what was written so far. Start a message with // to send
one that begins with a slash."""


class UsageError(Exception):
    """A slash command used wrongly: one line, the loop goes on."""


def _say(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _mb(gb: float) -> str:
    return f"{gb * 1000:.1f} MB" if gb < 1 else f"{gb:.2f} GB"


def _kept(kept: list[int], d_ffn: int) -> str:
    lo, hi = min(kept), max(kept)
    return f"{lo}/{d_ffn}" if lo == hi else f"{lo}-{hi}/{d_ffn}"


class ChatREPL:
    """Reads lines, runs slash commands, streams answers of a ChatSession."""

    def __init__(self, session: ChatSession, interactive: bool):
        self.session, self.interactive = session, interactive
        self.engine = session.engine
        self._pruned_policy = session.policy if session.policy != "off" else "per-task"
        self.commands: dict[str, Callable[[str], bool | None]] = {
            "/help": self.help, "/?": self.help, "/density": self.density,
            "/reselect": self.reselect, "/dense": self.dense, "/policy": self.policy,
            "/selector": self.selector, "/prefill": self.prefill, "/max-tokens": self.max_tokens,
            "/stats": self.stats, "/mask": self.mask, "/reset": self.reset,
            "/clear": self.reset, "/save": self.save, "/quit": self.quit,
            "/exit": self.quit, "/bye": self.quit,
        }

    # -- the loop ----------------------------------------------------------------------

    def run(self) -> None:
        while True:
            try:
                line = self._read()
            except KeyboardInterrupt:
                _say("^C  (Ctrl-D or /quit to exit)")
                continue
            except EOFError:
                if self.interactive:
                    _say()
                return
            line = line.strip()
            if not line:
                continue
            try:
                if line.startswith("//"):  # a message that starts with "/"
                    self.answer(line[1:])
                elif line.startswith("/"):
                    if self.command(line):
                        return
                else:
                    self.answer(line)
            except (UsageError, IFPruneError) as e:
                error_line(str(e))
            except KeyboardInterrupt:  # during a command, or a selection before streaming
                _say("\n[interrupted]")

    def _read(self) -> str:
        if self.interactive:
            return input(">>> ")
        line = sys.stdin.readline()
        if not line:
            raise EOFError
        return line

    def command(self, line: str) -> bool:
        """Run a slash command; True means exit."""
        name, _, arg = line.partition(" ")
        handler = self.commands.get(name.lower())
        if handler is None:
            raise UsageError(f"unknown command {name}; /help lists the commands")
        return bool(handler(arg.strip()))

    def answer(self, text: str) -> None:
        """Stream the answer to `text`; Ctrl-C stops it after the current token."""
        responses = self.session.send(text)
        stop = _StopFlag()
        interrupted = False
        shown = ""
        with stop:
            try:
                for response in responses:
                    shown += response.text
                    sys.stdout.write(response.text)
                    sys.stdout.flush()
                    if stop.hit:
                        interrupted = True
                        break
            except KeyboardInterrupt:  # a second Ctrl-C: stop at once
                interrupted = True
            finally:
                responses.close()
        if interrupted:
            _say("\n[interrupted]")
        elif not shown.strip():
            _say("[empty answer: the model stopped at once; /dense or a higher /density may help]")
        else:
            _say()

    # -- commands ----------------------------------------------------------------------

    def help(self, arg: str) -> None:
        _say(HELP)

    def density(self, arg: str) -> None:
        if not arg:
            raise UsageError(f"usage: /density D, a fraction in (0, 1], e.g. /density 0.5 "
                             f"(now {self.session.density:.2f})")
        try:
            value = check_density(arg)
        except IFPruneError as e:
            raise UsageError(str(e)) from None
        k = self.session.set_density(value)
        note = ""
        if self.session.policy == "off":
            self.session.set_policy(self._pruned_policy)
            note = f"; pruning again ({self._pruned_policy})"
        _say(f"density {value:.2f}: keeps {k} of {self.engine.d_ffn} channels per layer from the next message{note}")

    def reselect(self, arg: str) -> None:
        policy = self.session.policy
        if policy == "off":
            raise UsageError("running dense: no mask to select; /dense or /density D turns pruning on")
        if policy == "per-turn":
            _say("per-turn: every message selects its own mask already")
            return
        self.session.reselect()
        _say("the next message selects a new mask and becomes the task")

    def dense(self, arg: str) -> None:
        if self.session.policy == "off":
            self.session.set_policy(self._pruned_policy)
            _say(f"pruning again: {self._pruned_policy}, density {self.session.density:.2f} "
                 f"({self.session.kept_count()} of {self.engine.d_ffn} channels)")
        else:
            self._pruned_policy = self.session.policy
            self.session.set_policy("off")
            _say(f"dense: all {self.engine.d_ffn} channels per layer, no selection (/dense again to prune)")

    def policy(self, arg: str) -> None:
        if arg not in POLICIES:
            raise UsageError(f"usage: /policy {'|'.join(POLICIES)} (now {self.session.policy})")
        self.session.set_policy(arg)
        if arg != "off":
            self._pruned_policy = arg
        _say(f"selection policy: {arg}")

    def selector(self, arg: str) -> None:
        names = "|".join(self.engine.selectors)
        if not arg:
            raise UsageError(f"usage: /selector {names} (now {self.session.selector.name})")
        try:
            self.session.set_selector(arg)
        except IFPruneError as e:
            raise UsageError(str(e)) from None
        self.session.reselect()
        _say(f"selector: {arg}; the next message selects a new mask")

    def prefill(self, arg: str) -> None:
        if arg not in PREFILLS:
            raise UsageError(f"usage: /prefill {'|'.join(PREFILLS)} (now {self.session.prefill})")
        self.session.set_prefill(arg)
        what = "every FFN channel, the answer pruned" if arg == "dense" else "the kept channels, as the answer"
        _say(f"prefill: {arg}; from the next message the predictor's prompts run on {what}")

    def max_tokens(self, arg: str) -> None:
        try:
            value = int(arg)
        except ValueError:
            value = 0
        if value < 1:
            raise UsageError(f"usage: /max-tokens N, a whole number >= 1 (now {self.session.max_tokens})")
        self.session.max_tokens = value
        _say(f"answers stop after {value} tokens")

    def stats(self, arg: str) -> None:
        t = self.session.last
        if t is None:
            _say("no turn yet: ask something first")
            return
        d_ffn = self.engine.d_ffn
        if t.mask == DENSE:
            select = "dense (policy off): no selection"
        else:
            how = f"{self.session.selector.name} ran" if t.selected else "cached selection"
            select = f"{t.select_ms:.1f} ms ({how}), mask {t.mask[:8]}"
        reuse = (f"{t.reused_tokens} reused from the mask's cache" if t.cache_hit
                 else "new cache for this mask")
        caches = []
        for key, n in self.session.cached_masks().items():
            mask, dense = split_cache_key(key)
            caches.append(f"{mask[:8]}{' dense-prefilled' * dense} ({n} tok)")
        rows = [
            ("policy", t.policy),
            ("select", select),
            ("apply", f"{t.apply_ms:.1f} ms, {t.swaps} row swaps" + (
                f", read {t.read_bytes / 1e6:.1f} MB ({t.rows_read} rows) in {t.read_ms:.1f} ms"
                if self.engine.residency else "")),
            ("prefill", f"{t.prefill_tokens} tokens{' dense' if t.dense_prefill else ''} ({reuse}), "
                        f"{t.prefill_tps:.0f} tok/s"),
            ("first token", f"{t.ttft_ms:.1f} ms"),
            ("decode", f"{t.generation_tokens} tokens, {t.decode_tps:.1f} tok/s ({t.finish_reason})"),
            ("kept", f"{_kept(t.kept_counts, d_ffn)} channels per layer (density {t.density:.2f})"),
            ("default", f"density {self.engine.default_density:.2f}: {density_origin(self.engine)}"),
            ("memory", f"peak {_mb(t.peak_memory_gb)} this turn, weights {_mb(self.engine.weight_bytes() / 1e9)}"
             + (" in memory" if self.engine.residency else "")),
            ("resident", describe(self.engine)),
            ("KV caches", f"{', '.join(caches)}; {_mb(self.session.cache_bytes() / 1e9)}" if caches else "none"),
        ]
        for key, value in rows:
            _say(f"{key:<12} {value}")

    def mask(self, arg: str) -> None:
        s = self.session
        if s.last is None:
            _say(f"no mask yet: the next message selects one ({s.policy}, density {s.density:.2f}, "
                 f"{s.kept_count()} of {self.engine.d_ffn} channels per layer)")
            return
        d_ffn, n_layers = self.engine.d_ffn, self.engine.n_layers
        sel, prev = s.mask.selection, s.previous
        if sel is None:
            _say(f"dense: all {d_ffn} channels in each of {n_layers} layers")
            return
        head = f"mask {s.mask.key[:8]} ({sel.source}), density {sel.density:.2f}"
        overlap = None
        if prev is None:
            head += "; no previous mask"
        elif prev.dense:
            head += "; previous: dense"
        else:
            overlap = sel.overlap(prev.selection)
            head += f"; overlap with previous mask {prev.key[:8]}"
        _say(head)
        _say("layer  kept" + ("      overlap" if overlap else ""))
        for layer, kept in enumerate(sel.kept_counts):
            row = f"{layer:>5}  {kept:>4}/{d_ffn}"
            if overlap:
                row += f"  {overlap[layer]:.2f}"
            _say(row)
        if overlap:
            _say(f"mean overlap {sum(overlap) / len(overlap):.2f} (Jaccard of kept channels)")

    def reset(self, arg: str) -> None:
        self.session.reset()
        _say("conversation cleared")

    def save(self, arg: str) -> None:
        if not arg:
            raise UsageError("usage: /save FILE")
        try:
            path = self.session.save(arg)
        except OSError as e:
            raise UsageError(f"cannot write {arg}: {e.strerror or e}") from None
        _say(f"saved {len(self.session.messages)} messages, {len(self.session.turns)} turns to {path}")

    def quit(self, arg: str) -> bool:
        return True


class _StopFlag:
    """While active, the first Ctrl-C sets .hit (the stream stops after its token); the
    second raises KeyboardInterrupt."""

    def __enter__(self):
        self.hit = False
        self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame):
        if self.hit:
            raise KeyboardInterrupt
        self.hit = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self._old)
        return False


def _setup_readline(commands: list[str]) -> None:
    """History in ~/.ifprune_history (or $IFPRUNE_HISTORY); Tab completes slash commands."""
    try:
        import readline
    except ImportError:  # Windows without pyreadline: plain input()
        return
    import atexit

    def complete(text: str, state: int):
        matches = [c + " " for c in commands if c.startswith(text)] if text.startswith("/") else []
        return matches[state] if state < len(matches) else None

    readline.set_completer(complete)
    readline.set_completer_delims(" \t\n")
    if "libedit" in (readline.__doc__ or ""):  # macOS's Python links libedit
        readline.parse_and_bind("bind ^I rl_complete")
    else:
        readline.parse_and_bind("tab: complete")

    history = Path(os.environ.get("IFPRUNE_HISTORY", "~/.ifprune_history")).expanduser()
    try:
        readline.read_history_file(history)
    except OSError:
        pass
    readline.set_history_length(1000)

    def write():
        try:
            readline.write_history_file(history)
        except OSError:
            pass

    atexit.register(write)


@friendly_errors
def chat(
    model: Optional[str] = MODEL_ARGUMENT,
    density: Optional[float] = DENSITY_OPTION,
    max_tokens: int = typer.Option(512, "--max-tokens", "-m", help="Most tokens per answer."),
    temp: float = TEMP_OPTION,
    top_p: float = TOP_P_OPTION,
    seed: Optional[int] = SEED_OPTION,
    policy: str = typer.Option("per-task", "--policy", help="When to select a mask: per-task (first message), per-turn (every message), off (dense)."),
    selector: Optional[str] = typer.Option(None, "--selector", help="Who selects: predictor (the trained one; default where the bundle has one) or activations (training-free, any model)."),
    system: Optional[str] = typer.Option(None, "--system", help="A system message."),
    prefill: Optional[str] = PREFILL_OPTION,
    resident: Optional[str] = RESIDENT_OPTION,
    max_density: Optional[float] = MAX_DENSITY_OPTION,
):
    """Chat with a pruned model: streams answers; /help lists the slash commands."""
    if density is not None:
        check_density(density)
    if policy not in POLICIES:
        fail(f"--policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    check_sampling(max_tokens=max_tokens, temp=temp, top_p=top_p, seed=seed)  # the engine's check, before loading
    checked_prefill(prefill)
    engine, found = open_model(model, **resident_options(resident, max_density))
    session = ChatSession(engine, policy=policy, density=density, selector=selector, system=system,
                          max_tokens=max_tokens, temp=temp, top_p=top_p, seed=seed, prefill=prefill)
    interactive = sys.stdin.isatty()
    repl = ChatREPL(session, interactive)
    if interactive:
        _setup_readline(sorted(repl.commands))
        what = ("dense (no selection)" if policy == "off" else
                f"{policy} selection, density {session.density:.2f} "
                f"({session.kept_count()} of {engine.d_ffn} channels per layer)")
        who = {"predictor": "trained predictor", "activations": "training-free selector"}[session.selector.name]
        if policy != "off" and session.prefills_dense():
            who += ", prompts prefilled dense"
        if policy != "off" and density is None:
            what += f"; {density_origin(engine)}"
        typer.secho(f"{found.path}: {engine.config['model_type']}, {engine.n_layers} layers, {who}; {what}",
                    dim=True)
        typer.secho("/help for commands, Ctrl-C stops an answer, Ctrl-D or /quit exits", dim=True)
    repl.run()
