"""Template injection: a corpus of hostile chat templates, all refused or cut off, none reaching Python.

A GGUF file's ``tokenizer.chat_template`` is a program from a stranger (llama-cpp-python's CVE-2024-34359
was code execution through it). Every payload in ESCAPES is a *working* exploit: the positive control
renders each one in a plain ``jinja2.Environment`` and watches it create a directory or fire a sentinel.
The same payloads through ``ChatTemplate`` (and through ``ripe run`` on a model file carrying one) must
raise TemplateError with nothing created and no sentinel fired. BOMBS exhaust time or memory (loops that
explode, recursion, output bombs, huge ranges) and must stop within the render's limits.
tests/test_chat_template.py holds the first corpus; this one extends it.
"""

from __future__ import annotations

import copy
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import jinja2
import pytest
from gguf_factory import build_tiny_model
from gguf_mutations import set_string_kv

from ripelm.runtime.chat_template import ChatTemplate, TemplateError

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]


class Probe:
    """A value a caller hands to a template: reaching its private method is an escape."""

    def __init__(self) -> None:
        self.fired = False

    def _fire(self) -> str:
        self.fired = True
        return ""


# Each creates `target` (a directory or file) or fires `probe` if it reaches Python internals.
ESCAPES = [
    # __class__ / __mro__ / __subclasses__, with the attribute name hidden from a naive filter
    "{% for c in ''['__cla' ~ 'ss__'].__mro__[1].__subclasses__() %}{% if c.__name__ == 'catch_warnings' %}"
    "{{ c()._module.__builtins__['__import__']('os').mkdir(target) }}{% endif %}{% endfor %}",
    "{% for c in (''|attr('__class__')|attr('__mro__'))[1]|attr('__subclasses__')() %}"
    "{% if c.__name__ == 'catch_warnings' %}{{ c()._module.__builtins__['__import__']('os').mkdir(target) }}"
    "{% endif %}{% endfor %}",
    "{% set k = ['__', 'class', '__']|join %}{% for c in ()[k].__base__.__subclasses__() %}"
    "{% if c.__name__ == 'catch_warnings' %}{{ c()._module.__builtins__['__import__']('os').mkdir(target) }}"
    "{% endif %}{% endfor %}",
    "{% for c in messages.__class__.__mro__[-1].__subclasses__() %}{% if c.__name__ == '_wrap_close' %}"
    "{{ c.__init__.__globals__['mkdir'](target) }}{% endif %}{% endfor %}",
    # __globals__ through every function the template can name
    "{{ lipsum.__globals__.__builtins__.__import__('os').mkdir(target) }}",
    "{{ namespace.__init__.__globals__['os'].mkdir(target) }}",
    "{{ cycler(1).__class__.__init__.__globals__['os'].mkdir(target) }}",
    "{{ joiner().__call__.__globals__['os'].mkdir(target) }}",
    "{{ cycler.reset.__globals__['os'].mkdir(target) }}",
    "{% macro m() %}{% endmacro %}{{ m._func.__globals__['environment'].__class__.__init__.__globals__"
    "['os'].mkdir(target) }}",
    "{{ self.__init__.__globals__['__builtins__']['__import__']('os').mkdir(target) }}",
    "{{ lipsum.__globals__['os'].mkdir(target) }}",
    "{{ lipsum.__globals__.__builtins__.open(target, 'w').write('x') }}",
    "{{ lipsum.__globals__.__builtins__.exec(\"import os; os.mkdir(t)\", {'t': target}) }}",
    "{{ lipsum.__globals__.__builtins__.eval(\"__import__('os').mkdir(t)\", {'t': target}) }}",
    # cycler / joiner / namespace tricks
    "{% set ns = namespace(f=cycler.__init__) %}{{ ns.f.__globals__.os.mkdir(target) }}",
    "{% set ns = namespace() %}{% set ns.g = joiner.__init__.__globals__ %}{{ ns.g.os.mkdir(target) }}",
    "{% set c = cycler(cycler.__init__.__globals__) %}{{ c.next().os.mkdir(target) }}",
    "{% set j = joiner(cycler.__init__.__globals__.os) %}{{ j() }}{{ j().mkdir(target) }}",
    # attr() and format tricks
    "{{ (cycler|attr('__in' ~ 'it__')|attr('__glo' ~ 'bals__'))['os']|attr('mkdir')(target) }}",
    "{{ cycler|attr('\\u005f\\u005finit\\u005f\\u005f')|attr('__globals__')|attr('get')('os')"
    "|attr('mkdir')(target) }}",
    "{{ ('{0.__init__.__globals__[os].mkdir}'.format(cycler))|length }}"
    "{{ cycler.__init__.__globals__.os.mkdir(target) }}",
    "{{ '{0.__globals__[os]}'.format(lipsum) }}{{ lipsum.__globals__.os.mkdir(target) }}",
    "{{ '%s'|format(cycler.__init__.__globals__.os.mkdir(target)) }}",
    "{{ ''.__class__.__mro__[1].__subclasses__()|length }}{{ cycler.__init__.__globals__.os.mkdir(target) }}",
    "{{ messages|map(attribute='__class__')|list }}{{ cycler.__init__.__globals__.os.mkdir(target) }}",
    "{{ (messages|selectattr('__class__')|list) }}{{ cycler.__init__.__globals__.os.mkdir(target) }}",
    "{{ messages|sort(attribute='__class__.__name__')|list }}"
    "{{ cycler.__init__.__globals__.os.mkdir(target) }}",
    # loop / caller / self internals
    "{% for m in messages %}{{ loop.cycle.__func__.__globals__['__builtins__']['__import__']('os')"
    ".mkdir(target) if loop.first }}"
    "{% endfor %}",
    "{% macro w() %}{{ caller.__init__.__globals__['__builtins__']['__import__']('os').mkdir(target) }}"
    "{% endmacro %}"
    "{% call w() %}x{% endcall %}",
    "{{ self._TemplateReference__context.environment.__class__.__init__.__globals__['os'].mkdir(target) }}",
    # a value handed in by the caller: its private and dunder methods are out of reach too
    "{{ probe._fire() }}",
    "{{ probe.__class__._fire(probe) }}",
    "{{ (probe|attr('_fire'))() }}",
    "{{ probe.__dict__.update({'fired': True}) }}{{ probe._fire() }}",
]

BOMBS = [
    # loops that explode
    "{% for a in messages * 100000 %}{% for b in messages * 100000 %}{% endfor %}{% endfor %}",
    "{% for a in range(99999) %}{% for b in range(99999) %}{% for c in range(99999) %}{% endfor %}"
    "{% endfor %}{% endfor %}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{% if loop.index is divisibleby 7 %}"
    "{% continue %}{% endif %}{% endfor %}{% endfor %}",
    "{% for i in range(100000)|list %}{% for j in range(100000)|list %}{% endfor %}{% endfor %}",
    "{% for x in range(100000)|batch(1) %}{% for y in range(100000)|batch(1) %}{% endfor %}{% endfor %}",
    "{% set ns = namespace(n=0) %}{% for i in range(100000) %}{% for j in range(100000) %}"
    "{% set ns.n = ns.n + 1 %}{% endfor %}{% endfor %}",
    # recursion
    "{% macro r(n) %}{{ r(n + 1) }}{% endmacro %}{{ r(0) }}",
    "{% macro a(n) %}{{ b(n) }}{% endmacro %}{% macro b(n) %}{{ a(n) }}{% endmacro %}{{ a(0) }}",
    "{% macro r(n) %}{% set ns = namespace(f=r) %}{{ ns.f(n) }}{% endmacro %}{{ r(0) }}",
    "{% for m in messages recursive %}{{ loop([m, m]) }}{% endfor %}",
    "{% for x in [1, 2, 3] recursive %}{{ loop([x] * 3) }}{% endfor %}",
    "{% macro f(n) %}{% for i in range(10) %}{{ f(n) }}{% endfor %}{% endmacro %}{{ f(0) }}",
    # output bombs
    "{% for i in range(100000) %}{{ lipsum(100, html=False, min=100, max=1000) }}{% endfor %}",
    "{% for i in range(100000) %}{{ messages|tojson }}{{ range(1000)|list }}{% endfor %}",
    "{% for i in range(100000) %}{{ messages }}{{ 'x' * 100000 }}{% endfor %}",
    "{% set s = 'x' * 3000000 %}{{ s }}",
    "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = [ns.s, ns.s]|join %}{% endfor %}"
    "{{ ns.s }}",
    "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = '%s%s' % (ns.s, ns.s) %}"
    "{% endfor %}",
    "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = '{}{}'.format(ns.s, ns.s) %}"
    "{% endfor %}",
    "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s|replace('a', 'aa') %}"
    "{% endfor %}",
    "{% set ns = namespace(d={}) %}{% for i in range(40) %}{% set ns.d = {'a': ns.d, 'b': ns.d} %}"
    "{% endfor %}{{ ns.d|tojson }}",
    "{% set ns = namespace(l=[1]) %}{% for i in range(40) %}{% set ns.l = ns.l + ns.l %}{% endfor %}",
    "{% set ns = namespace(l=[1]) %}{% for i in range(64) %}{% set ns.l = [ns.l, ns.l]|list %}{% endfor %}"
    "{{ ns.l|string|length }}",
    "{% filter upper %}{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}{% endfilter %}",
    "{{ ('x' * 1000000)|truncate(10**18) }}",
    "{{ (range(100000)|list)|slice(10**9)|list }}",
    "{{ ('a' * 1000000)|center(10**9) }}",
    "{{ 'x'.rjust(10**18) }}",
    "{{ 'x'.zfill(10**9) }}",
    "{{ '%.1000000000f' % 1.0 }}",
    "{{ '{:.1000000000f}'.format(1.0) }}",
    "{{ '{:,}'.format(10 ** 100000) }}",
    "{{ 9 ** (9 ** 9) }}",
    "{{ 10 ** (10 ** 10) }}",
    "{{ (2 ** 8000) * (2 ** 8000) }}",
    "{{ (1,) * 10**9 }}",
    "{{ 'ab' * (10**9)|int }}",
    "{{ messages * 10**9 }}",
    # huge ranges
    "{{ range(0 - 10**18, 10**18)|length }}",
    "{{ range(0, 10**100, 1)|list }}",
    "{{ range(10**9)|list }}",
    "{{ range(10**5)|list|string * 1000 }}",
    "{% for i in range(10**18, 0, -1) %}{% endfor %}",
]


def _plain_render(payload: str, target: Path, probe: Probe) -> None:
    env = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"])
    env.from_string(payload).render(target=str(target), messages=copy.deepcopy(MESSAGES), probe=probe)


@pytest.mark.parametrize("payload", ESCAPES)
def test_payload_escapes_a_plain_environment(payload: str, tmp_path: Path) -> None:
    """Positive control: without the sandbox each payload really does reach the OS or the probe."""
    target, probe = tmp_path / "escaped", Probe()
    _plain_render(payload, target, probe)
    assert target.exists() or probe.fired


@pytest.mark.parametrize("payload", ESCAPES)
def test_payload_is_refused_by_the_sandbox(payload: str, tmp_path: Path) -> None:
    target, probe = tmp_path / "escaped", Probe()
    messages = copy.deepcopy(MESSAGES)
    with pytest.raises(TemplateError, match="^chat template refused: access to unsafe attribute") as info:
        ChatTemplate(payload).render(messages, target=str(target), probe=probe)
    assert "\n" not in str(info.value)
    assert not target.exists() and not probe.fired
    assert messages == MESSAGES


@pytest.mark.parametrize("source", BOMBS)
def test_bomb_is_cut_off(source: str) -> None:
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with pytest.raises(TemplateError) as info:
        ChatTemplate(source, time_limit=0.5).render(copy.deepcopy(MESSAGES))
    elapsed = time.perf_counter() - start
    msg = str(info.value)
    assert "\n" not in msg
    assert any(w in msg for w in ("exceeded", "refused", "recursed", "wrote more", "failed")), msg
    assert elapsed < 3.0, (elapsed, msg)  # 0.5 s limit, plus the slack of a shared 2-core machine
    # Peak RSS may not jump by more than a few values' worth (a 4 M-character value is ~4-16 MB).
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert grown_mb < 200, grown_mb


def test_memory_is_bounded_where_templates_render() -> None:
    """A value far past the output limit that never reaches the output still meets the memory limit, and the
    render process serves the next template afterwards."""
    with pytest.raises(TemplateError, match="^chat template exceeded its memory limit$"):
        ChatTemplate("{{ ('x' * 300000000)|length }}").render(copy.deepcopy(MESSAGES))
    assert ChatTemplate("{{ messages|length }}").render(copy.deepcopy(MESSAGES)) == "2"


def test_escaping_template_in_a_model_file_is_refused_by_ripe_run(
    tmp_path: Path, bundled_model_path: Path
) -> None:
    """End to end: the template rides in a GGUF file; `ripe run` prints one error line and exits 1."""
    target = tmp_path / "escaped"
    template = "{{ lipsum.__globals__.__builtins__.__import__('os').mkdir('" + str(target) + "') }}"
    model = build_tiny_model(tmp_path / "evil.gguf", hidden=64, ffn=128, context_length=256)
    _set_chat_template(model, template)
    env = {**os.environ, "RIPELM_HOME": str(tmp_path / "home")}
    proc = subprocess.run(
        [sys.executable, "-m", "ripelm.cli", "run", "--model", str(model), "--max-tokens", "2", "hello"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ripe: error: chat template refused"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not target.exists()


def _set_chat_template(model: Path, template: str) -> None:
    model.write_bytes(set_string_kv(model.read_bytes(), "tokenizer.chat_template", template))
