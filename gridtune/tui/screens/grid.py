"""The grid screen: templates, system prompt and variables, checked as you type.

The screen keeps the edited text; ``gridtune.pipeline.spec.grid_edit`` turns it into
a checked GridSpec (errors name the culprit), counts the cells and picks the
cell the preview renders. ctrl+s saves through ``pipeline.project.apply_spec``,
which keeps every completion whose cell still exists.
"""

from __future__ import annotations

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import OptionList, TextArea
from textual.widgets.option_list import Option

from ...pipeline.spec.grid import GridError, GridSpec, Value
from ...pipeline.spec.grid_edit import build_spec, cell_at, count_text, new_variable_name, parse_values, values_text
from ...pipeline.spec.project import apply_spec
from ..context import ProjectContext
from ..section import SectionScreen
from ..widgets.line import Line
from ..widgets.modals import AskModal, ConfirmModal

_TEMPLATES = ("generation", "training", "system")


class FieldArea(TextArea, inherit_bindings=False):
    """A TextArea without its f6/f7 (select line / all) keys: those switch sections here."""

    BINDINGS = [b for b in TextArea.BINDINGS if getattr(b, "key", None) not in ("f6", "f7")]


class GridScreen(SectionScreen):
    """Edit the grid; see its size, a rendered cell and any error at once."""

    MODE = "grid"

    CSS_PATH = "grid.tcss"
    HELP_TITLE = "Grid"
    HELP = ("The generation template is what the teacher model sees; the training template is what the "
            "fine-tuned model will be given (empty: the same). {name} is a variable; each variable's values "
            "are edited one per line. Saving keeps every completion whose cell still exists.")
    BINDINGS = [
        Binding("ctrl+s", "save", "save", id="grid.save", priority=True),
        Binding("ctrl+n", "add_variable", "add var", tooltip="add a variable", id="grid.add_variable"),
        Binding("ctrl+r", "remove_variable", "remove var", tooltip="remove the selected variable", show=False,
                id="grid.remove_variable"),  # in help and the palette: the footer keeps room for f1 help
        Binding("ctrl+down,alt+down", "cell(1)", "next cell", key_display="^↓", id="grid.next_cell"),
        Binding("ctrl+up,alt+up", "cell(-1)", "previous cell", key_display="^↑", show=False, id="grid.previous_cell"),
    ]

    def __init__(self, ctx: ProjectContext):
        super().__init__(ctx)
        self.saved: GridSpec | None = None  # the spec in the project file
        self.dirty = False  # edits not saved yet (the app asks before quitting)
        self.variables: dict[str, list[Value]] = {}
        self.selected: str | None = None
        self.cell_index = 0
        self.current: GridSpec | None = None  # the edited spec when it checks
        self.error: str | None = None
        self._loading = False
        self._saving = False
        self.file_changed = False  # the spec in the file changed under unsaved edits

    # -- layout ------------------------------------------------------------------
    def compose_body(self) -> ComposeResult:
        with Horizontal(classes="info-bar"):
            yield Line(id="grid-count")
            yield Line(id="grid-dirty")
        yield Line(id="grid-error", classes="error-line")
        with Horizontal(id="grid-body"):
            with Vertical(id="grid-left"):
                yield OptionList(id="grid-variables")
                yield FieldArea(id="grid-values", soft_wrap=False)
            with Vertical(id="grid-right"):
                for which in _TEMPLATES:
                    yield FieldArea(id=f"grid-{which}", soft_wrap=True)
                with VerticalScroll(id="grid-preview-box"):
                    yield Line(id="grid-preview")

    def unsaved_work(self) -> str | None:
        return "The grid has unsaved edits" if self.dirty else None

    def on_mount(self) -> None:
        titles = {
            "grid-variables": "variables", "grid-values": "values",
            "grid-generation": "generation template", "grid-training": "training template (empty: same)",
            "grid-system": "system prompt", "grid-preview-box": "preview",
        }
        for wid, title in titles.items():
            self.query_one(f"#{wid}").border_title = title
        self.query_one("#grid-error").display = False
        self._load()

    @work(thread=True, exclusive=True, group="grid-load", exit_on_error=False)
    def _load(self) -> None:
        spec = self.ctx.reload_spec()
        self.app.call_from_thread(self._populate, spec)

    def _populate(self, spec: GridSpec, *, focus: bool = True) -> None:
        self._loading = True
        try:
            self.saved = spec
            self.file_changed = False
            self.variables = {k: list(v) for k, v in spec.variables.items()}
            self.query_one("#grid-generation", TextArea).load_text(spec.generation)
            self.query_one("#grid-training", TextArea).load_text(spec.training or "")
            self.query_one("#grid-system", TextArea).load_text(spec.system or "")
            if self.selected not in self.variables:
                self.selected = next(iter(self.variables), None)
            self._show_variables()
            self._show_values()
        finally:
            self._loading = False
        self.recheck()
        if focus:
            self.query_one("#grid-generation", TextArea).focus()

    # -- changes made elsewhere --------------------------------------------------------
    def refresh_from_project(self, what: frozenset[str]) -> None:
        """The spec may have changed in the file (the generate screen's defaults,
        another process): show it if nothing here is unsaved, else say so."""
        if not what.isdisjoint({"grid", "settings", "external"}) and not self._saving:
            self._reload()

    @work(thread=True, exclusive=True, group="grid-load", exit_on_error=False)
    def _reload(self) -> None:
        spec = self.ctx.reload_spec()
        self.app.call_from_thread(self._file_spec, spec)

    def _file_spec(self, spec: GridSpec) -> None:
        if self.saved is None or spec.to_json() == self.saved.to_json():
            return  # our own save, or a change that did not touch the spec
        if not self.dirty:
            self._populate(spec, focus=False)
            self.notify("the grid changed in the project file: reloaded", title="Grid")
            return
        self.file_changed = True
        self.recheck()
        self.notify("the grid changed in the project file; ctrl+s saves your edits over it",
                    title="Grid", severity="warning")

    # -- variables ------------------------------------------------------------------
    def _show_variables(self) -> None:
        options = self.query_one("#grid-variables", OptionList)
        options.clear_options()
        options.add_options([Option(f"{name} ({len(vals)})", id=name) for name, vals in self.variables.items()])
        if self.selected is not None:
            options.highlighted = list(self.variables).index(self.selected)

    def _update_variable_label(self, name: str) -> None:
        options = self.query_one("#grid-variables", OptionList)
        try:
            options.replace_option_prompt(name, f"{name} ({len(self.variables[name])})")
        except Exception:  # noqa: BLE001 - the list is rebuilt on the next change anyway
            self._show_variables()

    def _show_values(self) -> None:
        area = self.query_one("#grid-values", TextArea)
        box = area
        if self.selected is None:
            box.border_title = "values"
            area.load_text("")
            area.disabled = True
            return
        area.disabled = False
        box.border_title = f"{self.selected}: one per line"
        was = self._loading
        self._loading = True
        try:
            area.load_text(values_text(self.variables[self.selected]))
        finally:
            self._loading = was

    @on(OptionList.OptionHighlighted, "#grid-variables")
    def _variable_highlighted(self, event: OptionList.OptionHighlighted) -> None:
        name = event.option.id
        if name is not None and name != self.selected and name in self.variables:
            self.selected = name
            self._show_values()

    @on(OptionList.OptionSelected, "#grid-variables")
    def _variable_selected(self, event: OptionList.OptionSelected) -> None:
        self.query_one("#grid-values", TextArea).focus()

    def action_add_variable(self) -> None:
        def named(name: str | None) -> None:
            if name is None:
                return
            try:
                name = new_variable_name(name, list(self.variables))
            except GridError as exc:
                self.notify(str(exc), severity="error")
                return
            self.variables[name] = []
            self.selected = name
            self._show_variables()
            self._show_values()
            self.recheck()
            self.query_one("#grid-values", TextArea).focus()

        self.app.push_screen(
            AskModal("Name of the new variable (use it in a template as {name}):", title="Add variable",
                     placeholder="e.g. season"),
            named,
        )

    def action_remove_variable(self) -> None:
        name = self.selected
        if name is None:
            return

        def answered(yes: bool | None) -> None:
            if not yes or name not in self.variables:
                return
            del self.variables[name]
            self.selected = next(iter(self.variables), None)
            self._show_variables()
            self._show_values()
            self.recheck()

        self.app.push_screen(
            ConfirmModal(f"Remove variable {name!r} and its {len(self.variables[name])} value(s)? "
                         "(Nothing changes in the project until you save.)", title="Remove variable"),
            answered,
        )

    # -- editing -----------------------------------------------------------------------
    @on(TextArea.Changed)
    def _changed(self, event: TextArea.Changed) -> None:
        if self._loading:
            return
        if event.text_area.id == "grid-values" and self.selected is not None:
            previous = self.saved.variables.get(self.selected, []) if self.saved else []
            values = parse_values(event.text_area.text, previous)
            if values != self.variables.get(self.selected):
                self.variables[self.selected] = values
                self._update_variable_label(self.selected)
        self.recheck()

    def _texts(self) -> dict[str, str]:
        return {which: self.query_one(f"#grid-{which}", TextArea).text for which in _TEMPLATES}

    def recheck(self) -> None:
        """Check the edited grid: count, error, unsaved marker, preview."""
        if self.saved is None:
            return
        texts = self._texts()
        try:
            self.current = build_spec(self.saved, variables=self.variables, **texts)
            self.error = None
        except GridError as exc:
            self.current = None
            self.error = str(exc)
        self._set("#grid-count", count_text(self.variables))
        dirty = self.current is None or self.current.to_json() != self.saved.to_json()
        self.dirty = dirty
        if dirty and self.file_changed:
            self._set("#grid-dirty", "● unsaved · the file changed too · ctrl+s save")
        else:
            self._set("#grid-dirty", "● unsaved · ctrl+s save" if dirty else "saved")
        error = self.query_one("#grid-error", Line)
        error.display = self.error is not None
        self._set("#grid-error", f"✗ {self.error}" if self.error else "")
        self.sub_title = "unsaved" if dirty else ""
        self._show_preview()

    def _set(self, selector: str, text: str | Text) -> None:
        """Set a line; it repaints only if what it says changed."""
        self.query_one(selector, Line).text = text

    def _show_preview(self) -> None:
        box = self.query_one("#grid-preview-box")
        spec = self.current
        if spec is None:
            box.border_title = "preview"
            self._set("#grid-preview", Text("fix the error above to see a rendered cell", style="dim"))
            return
        total = spec.cell_count
        self.cell_index %= max(1, total)
        values = cell_at(spec.variables, self.cell_index)
        rendered = spec.render(values)
        box.border_title = f"preview: cell {self.cell_index + 1:,}/{total:,}"
        text = Text()
        text.append("cell ", "dim")
        text.append(" · ".join(f"{k}={v}" for k, v in values.items()) + "\n")
        if rendered.system:
            text.append("system ", "bold")
            text.append(rendered.system + "\n")
        text.append("teacher ", "bold")
        text.append(rendered.generation + "\n")
        text.append("training ", "bold")
        text.append(rendered.training)
        self._set("#grid-preview", text)

    def action_cell(self, delta: int) -> None:
        self.cell_index += delta
        self._show_preview()

    # -- saving --------------------------------------------------------------------------
    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "save":
            return True if self.current is not None and not self._saving else None
        if action == "remove_variable":
            return True if self.selected is not None else None
        return True

    def action_save(self) -> None:
        if self._saving:
            return
        if self.current is None:
            self.notify(f"not saved: {self.error}", severity="error")
            return
        self._saving = True
        self._save(self.current)

    @work(thread=True, exclusive=True, group="grid-save", exit_on_error=False)
    def _save(self, spec: GridSpec) -> None:
        try:
            counts = apply_spec(self.ctx.store, spec)
            self.ctx.reload_spec()
        except (GridError, Exception) as exc:  # noqa: BLE001 - shown, never a crash
            self.app.call_from_thread(self._save_failed, str(exc))
            return
        self.app.call_from_thread(self._saved, spec, counts)

    def _saved(self, spec: GridSpec, counts: dict[str, int]) -> None:
        self._saving = False
        self.saved = spec
        self.file_changed = False
        self.changed("grid")
        self.notify(
            f"saved: {counts['cells']:,} cells ({counts['added']:,} added, {counts['kept']:,} kept, "
            f"{counts['removed']:,} removed)",
            title="grid",
        )
        self.recheck()

    def _save_failed(self, message: str) -> None:
        self._saving = False
        self.notify(f"not saved: {message}", severity="error")
