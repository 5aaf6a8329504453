"""``invcache report``: one self-contained HTML page of a workspace (SPEC §5).

The page gathers every finished analysis under ``<root>/analysis/<name>/`` (a folder counts once
its ``results.json`` is there: analyses write it last and atomically) with its headline figures,
its mean ± 95% CI tables, the names of its CSVs and its PNG figures embedded as ``data:`` URIs;
then the provenance of each cache under ``<root>/cache/`` (model, weights, size, images,
perturbation, dates, the ``invcache extract`` command that made it) and of each module under
``<root>/modules/`` (what it maps, epoch, best validation loss, training cache, the
``invcache train`` command).

The page needs no network: no scripts, fonts or external styles, CSS inline, and a
Content-Security-Policy that forbids every other load. Every string from the workspace (folder
names, paths, metadata, results) is escaped; a results file that cannot be read is listed as
unreadable with the reason instead of stopping the report.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import shlex
import time
from collections.abc import Iterable
from dataclasses import MISSING, fields
from pathlib import Path

from invcache.errors import UsageError
from invcache.settings import ExtractSettings, TrainSettings, default
from invcache.workspace import Workspace

REPORT = "report.html"
RESULTS = "results.json"  # the name every analysis writes last (invcache.analysis.common.RESULTS)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Settings fields whose command-line option has another name, and TrainSettings fields with no option at all.
OPTION_NAMES = {"workspace": "root", "from_tap": "from", "transforms": "transform"}
API_ONLY = {"shuffle_window", "log_every"}
# The Content-Security-Policy of the page: nothing loads but inline styles and data: images.
POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

STYLE = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d1d1f; margin: 0 auto;
       max-width: 1100px; padding: 1.5em 2em 4em; }
h1 { font-size: 1.7em; margin-bottom: 0.2em; }
h2 { border-bottom: 2px solid #d0d4da; padding-bottom: 0.2em; margin-top: 2.2em; }
h3 { margin: 1.6em 0 0.4em; }
.meta, .note { color: #5a5f66; }
.unreadable { color: #a3121f; }
table { border-collapse: collapse; margin: 0.6em 0 1em; }
th, td { border: 1px solid #d0d4da; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f2f4f7; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
code, pre { font: 13px ui-monospace, "DejaVu Sans Mono", monospace; background: #f2f4f7; border-radius: 3px; }
code { padding: 0.05em 0.3em; }
pre { padding: 0.5em 0.8em; white-space: pre-wrap; overflow-wrap: anywhere; }
figure { margin: 1em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #d0d4da; }
figcaption { color: #5a5f66; font-size: 0.9em; }
"""


def build_report(root: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Write the report of the workspace at ``root`` to ``out`` (default ``<root>/report.html``); returns its path."""
    workspace = Workspace.at(root)
    if not workspace.root.is_dir():
        raise UsageError(f"no workspace at {workspace.root}; make one with `invcache extract`, `invcache train` and "
                         "`invcache analyze` (or pass the root)")
    out = Path(out) if out is not None else workspace.root / REPORT
    page = render(workspace.root)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.{os.getpid()}.partial")
    try:
        partial.write_text(page, encoding="utf-8")
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return out


def render(root: Path) -> str:
    """The whole page, as text."""
    analyses = _subfolders(root / "analysis")
    finished = [folder for folder in analyses if (folder / RESULTS).is_file()]
    caches = _subfolders(root / "cache")
    modules = _subfolders(root / "modules")
    trained = [folder for folder in modules if (folder / "best.json").is_file()]
    generated = time.strftime("%Y-%m-%d %H:%M:%S %z")
    sections = [
        _analyses_section(finished, [f for f in analyses if f not in finished]),
        _caches_section(caches),
        _modules_section(trained, [f for f in modules if f not in trained]),
    ]
    listed = "".join(f'<li><a href="#analysis-{i}">{_e(folder.name)}</a></li>' for i, folder in enumerate(finished))
    contents = (f'<li><a href="#analyses">Analyses ({len(finished)})</a>' + (f"<ul>{listed}</ul>" if listed else "")
                + f'</li><li><a href="#caches">Caches ({len(caches)})</a></li>'
                f'<li><a href="#modules">Modules ({len(trained)})</a></li>')
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{_e(POLICY)}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>invcache report: {_e(root.name or str(root))}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        f"<h1>invcache report</h1>\n"
        f'<p class="meta">Workspace <code>{_e(str(root))}</code> · generated {_e(generated)} · invcache '
        f"{_e(_version())}</p>\n<nav><ul>{contents}</ul></nav>\n"
        + "\n".join(sections) + "\n</body>\n</html>\n"
    )


# -- analyses ------------------------------------------------------------------------------


def _analyses_section(finished: list[Path], unfinished: list[Path]) -> str:
    parts = ['<section id="analyses">\n<h2>Analyses</h2>']
    if not finished:
        parts.append('<p class="note">No analyses in this workspace yet (no <code>analysis/&lt;name&gt;/'
                     f'{RESULTS}</code>); run e.g. <code>invcache analyze stages</code>.</p>')
    if unfinished:
        parts.append(f'<p class="note">Not finished (no {RESULTS}): '
                     + ", ".join(f"<code>{_e(f.name)}</code>" for f in unfinished) + ".</p>")
    parts += [_analysis(folder, f"analysis-{i}") for i, folder in enumerate(finished)]
    parts.append("</section>")
    return "\n".join(parts)


def _analysis(folder: Path, anchor: str) -> str:
    head = f'<article id="{anchor}">\n<h3>{_e(folder.name)}</h3>'
    try:
        results = json.loads((folder / RESULTS).read_text(encoding="utf-8"))
        if not isinstance(results, dict):
            raise ValueError(f"{RESULTS} holds a JSON {type(results).__name__}, not an object")
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return f'{head}\n<p class="unreadable">unreadable: {_e(_reason(exc))}</p>\n</article>'
    parts = [head, _analysis_meta(results)]
    headline = results.get("headline")
    if isinstance(headline, dict) and headline:
        parts.append(_table([[k, v] for k, v in headline.items()], ["headline", "value"]))
    elif headline is not None:
        parts.append(f"<p>headline: {_e(_format(headline))}</p>")
    for key, value in results.items():
        if _is_ci_table(value):
            parts.append(_ci_table(key, value))
    files = results.get("files") if isinstance(results.get("files"), dict) else {}
    tables = _strings(files.get("tables"))
    parts.append(f'<p class="note">Full results in <code>{RESULTS}</code>'
                 + (", tables in " + ", ".join(f"<code>{_e(t)}</code>" for t in tables) if tables else "")
                 + f" (folder <code>{_e(str(folder))}</code>).</p>")
    parts += [_figure(folder, name) for name in _strings(files.get("figures"))]
    parts.append("</article>")
    return "\n".join(p for p in parts if p)


def _analysis_meta(results: dict) -> str:
    """The line under an analysis' title: images evaluated, the cache and the modules it read."""
    bits = []
    if isinstance(results.get("images"), int):
        bits.append(f"{results['images']} images")
    provenance = results.get("provenance") if isinstance(results.get("provenance"), dict) else {}
    cache = provenance.get("cache")
    if isinstance(cache, dict) and cache.get("location"):
        bits.append(f"cache <code>{_e(str(cache['location']))}</code>")
    modules = provenance.get("modules")
    if isinstance(modules, dict) and modules:
        bits.append("modules " + ", ".join(f"<code>{_e(str(m))}</code>" for m in modules))
    return f'<p class="meta">{" · ".join(bits)}</p>' if bits else ""


def _is_ci_table(value: object) -> bool:
    """Whether ``value`` is {row: {column: {"mean": …, "ci95": …}}}, as ``mean_ci`` records them."""
    return (isinstance(value, dict) and bool(value) and all(
        isinstance(row, dict) and row and all(isinstance(cell, dict) and "mean" in cell for cell in row.values())
        for row in value.values()))


def _ci_table(key: str, value: dict) -> str:
    columns = list(dict.fromkeys(column for row in value.values() for column in row))
    rows = [[label, *(_mean_ci(cells.get(column)) for column in columns)] for label, cells in value.items()]
    return f"<p>{_e(key)}: mean ± 95% confidence interval</p>\n" + _table(rows, [key, *columns])


def _mean_ci(cell: object) -> str:
    if not isinstance(cell, dict):
        return "—"
    text = _format(cell.get("mean"))
    ci = cell.get("ci95")
    if isinstance(ci, (int, float)) and math.isfinite(ci):
        text += f" ± {_format(ci)}"
    if isinstance(cell.get("n"), int):
        text += f" (n={cell['n']})"
    return text


def _figure(folder: Path, name: str) -> str:
    """A PNG of the analysis embedded as a data: URI; a name that leaves the folder, or a file that is not a PNG,
    is named instead."""
    caption = f"<code>{_e(name)}</code>"
    if Path(name).name != name or name in ("", ".", ".."):
        return f'<p class="unreadable">figure {caption} refused: not a file name inside the analysis folder</p>'
    try:
        data = (folder / name).read_bytes()
    except OSError as exc:
        return f'<p class="unreadable">figure {caption} unreadable: {_e(_reason(exc))}</p>'
    if not data.startswith(PNG_SIGNATURE):
        return f'<p class="unreadable">figure {caption} unreadable: not a PNG file</p>'
    uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    return f'<figure><img src="{uri}" alt="{_e(name)}">\n<figcaption>{caption}</figcaption></figure>'


# -- caches --------------------------------------------------------------------------------


def _caches_section(folders: list[Path]) -> str:
    parts = ['<section id="caches">\n<h2>Caches</h2>']
    if not folders:
        parts.append('<p class="note">No caches (<code>cache/&lt;name&gt;/</code>) in this workspace.</p>')
    parts += [_cache(folder) for folder in folders]
    parts.append("</section>")
    return "\n".join(parts)


def _cache(folder: Path) -> str:
    from invcache.cache import open_cache

    head = f"<h3>cache {_e(folder.name)}</h3>"
    try:
        cache = open_cache(folder)
        attrs = cache.attrs
        images, valid, complete = cache.num_images, int(cache.valid.sum()), cache.complete_shards()
    except Exception as exc:  # any store that cannot be read is reported, not fatal
        return f'{head}\n<p class="unreadable">unreadable: {_e(_reason(exc))}</p>'
    model = _dict(attrs.get("model"))
    source = _dict(attrs.get("source"))
    size = _dict(attrs.get("preprocessing")).get("size")
    rows = [
        ["model", model.get("model")],
        ["weights", f"{model.get('weights')} (sha256 {str(model.get('weights_sha256'))[:16]})"],
        ["size (H×W)", "×".join(str(s) for s in size) if isinstance(size, list) else size],
        ["images / valid", f"{images} / {valid}"],
        ["shards complete", f"{int(complete.sum())} of {len(complete)}"],
        ["perturbation", attrs.get("perturbation") or "none"],
        ["source", " ".join(str(source.get(k)) for k in ("kind", "split") if source.get(k))],
        ["taps", ", ".join(str(t) for t in attrs.get("taps") or [])],
        ["on disk", _megabytes(_disk_bytes(folder))],
        ["created", attrs.get("created")],
        ["finished", attrs.get("finished")],
        ["failures", len(attrs.get("failures") or [])],
    ]
    command = settings_command("invcache extract", ExtractSettings, attrs.get("settings"))
    return "\n".join([head, _table(rows), _command_block(command)])


def _disk_bytes(folder: Path) -> int:
    total = 0
    for directory, _, names in os.walk(folder):
        for name in names:
            try:
                total += os.stat(os.path.join(directory, name), follow_symlinks=False).st_size
            except OSError:
                pass
    return total


# -- modules -------------------------------------------------------------------------------


def _modules_section(trained: list[Path], untrained: list[Path]) -> str:
    parts = ['<section id="modules">\n<h2>Modules</h2>']
    if not trained:
        parts.append('<p class="note">No trained modules (<code>modules/&lt;name&gt;/best.json</code>) in this '
                     "workspace.</p>")
    if untrained:
        parts.append('<p class="note">Without a best checkpoint yet: '
                     + ", ".join(f"<code>{_e(f.name)}</code>" for f in untrained) + ".</p>")
    parts += [_module(folder) for folder in trained]
    parts.append("</section>")
    return "\n".join(parts)


def _module(folder: Path) -> str:
    head = f"<h3>module {_e(folder.name)}</h3>"
    try:
        meta = json.loads((folder / "best.json").read_text(encoding="utf-8"))
        if not isinstance(meta, dict):
            raise ValueError(f"best.json holds a JSON {type(meta).__name__}, not an object")
    except (OSError, ValueError) as exc:
        return f'{head}\n<p class="unreadable">unreadable: {_e(_reason(exc))}</p>'
    spec = _dict(meta.get("spec"))
    model = _dict(_dict(meta.get("cache")).get("model"))
    inputs = spec.get("inputs")
    rows = [
        ["module", spec.get("name")],
        ["maps", f"{', '.join(map(str, inputs)) if isinstance(inputs, list) else inputs} → {spec.get('target')}"],
        ["config", spec.get("config")],
        ["epoch", meta.get("epoch")],
        ["best validation loss", meta.get("best_val_loss")],
        ["trained on", f"{meta.get('train_cache')} (validation: {meta.get('val_cache')})"],
        ["DETR", f"{model.get('name')} (weights sha256 {str(model.get('weights_sha256'))[:16]})"],
    ]
    command = settings_command("invcache train", TrainSettings, meta.get("settings"), positional=("name",))
    return "\n".join([head, _table(rows), _command_block(command)])


# -- commands ------------------------------------------------------------------------------


def settings_command(program: str, settings_class: type, settings: object, positional: Iterable[str] = ()
                     ) -> str | None:
    """The command line that runs ``settings`` (a recorded settings dataclass as a dict): non-default values only.

    ``ExtractSettings`` → ``invcache extract --split val2017 --model detr-tiny --size 64x96 …``;
    ``TrainSettings`` → ``invcache train backbone-inv --epochs 40 --width small`` (a learning rate
    equal to the module's own is left out). Fields that only the API sets follow as a comment.
    None when nothing was recorded.
    """
    if not isinstance(settings, dict):
        return None
    positional = tuple(positional)
    words = [program, *(str(settings[name]) for name in positional if settings.get(name) is not None)]
    api_only = []
    for field in fields(settings_class):
        if field.name in positional or field.name not in settings:
            continue
        value = settings[field.name]
        required = field.default is MISSING and field.default_factory is MISSING
        if value is None or value is False or (not required and _same(value, default(settings_class, field.name))):
            continue
        if field.name == "lr" and _same(value, _module_lr(settings.get("name"))):
            continue
        if field.name in API_ONLY:
            api_only.append(f"{field.name}={_format(value)}")
            continue
        option = "--" + OPTION_NAMES.get(field.name, field.name).replace("_", "-")
        if value is True:
            words.append(option)
        elif field.name == "size" and isinstance(value, list):
            words += [option, "x".join(str(v) for v in value)]
        elif field.name == "transforms" and isinstance(value, list):  # repeatable, applied in order
            for text in value:
                words += [option, str(text)]
        elif field.name == "ids" and isinstance(value, list):
            words += [option, ",".join(str(v) for v in value)]
        else:
            words += [option, str(value)]
    command = " ".join(shlex.quote(word) if i else word for i, word in enumerate(words))
    return command + (f"  # set through the API: {', '.join(api_only)}" if api_only else "")


def _module_lr(name: object) -> float | None:
    from invcache.inverse import LEARNING_RATES

    return LEARNING_RATES.get(name) if isinstance(name, str) else None


def _same(value: object, reference: object) -> bool:
    """Equal as JSON (a recorded (480, 640) is the list [480, 640])."""
    return value == json.loads(json.dumps(reference, default=str))


def _command_block(command: str | None) -> str:
    if command is None:
        return '<p class="note">The command that made it was not recorded.</p>'
    return f"<pre>{_e(command)}</pre>"


# -- small pieces --------------------------------------------------------------------------


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _format(value: object) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(", ", ": "), default=str)
    return str(value)


def _table(rows: list[list], columns: list | None = None) -> str:
    """A table of escaped cells; each row's first cell heads it.

    With ``columns``: a data table (header row, numbers right-aligned); without: a list of name/value pairs.
    """
    lines = ["<table>"]
    if columns:
        lines.append("<tr>" + "".join(f"<th>{_e(c)}</th>" for c in columns) + "</tr>")
    for row in rows:
        cells = []
        for i, value in enumerate(row):
            if i == 0:
                cells.append(f"<th>{_e(_format(value))}</th>")
            elif columns and isinstance(value, (int, float)) and not isinstance(value, bool):
                cells.append(f'<td class="num">{_e(_format(value))}</td>')
            else:
                cells.append(f"<td>{_e(_format(value))}</td>")
        lines.append("<tr>" + "".join(cells) + "</tr>")
    lines.append("</table>")
    return "\n".join(lines)


def _subfolders(path: Path) -> list[Path]:
    try:
        return sorted((p for p in path.iterdir() if p.is_dir()), key=lambda p: p.name)
    except OSError:
        return []


def _strings(value: object) -> list[str]:
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def _dict(value: object) -> dict:
    return value if isinstance(value, dict) else {}


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _version() -> str:
    from invcache import __version__

    return __version__
