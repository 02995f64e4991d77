"""The annotator's hands in Label Studio 1.23.2's editor (Selenium on Debian's Chromium): open a task, switch
Auto-Annotation on, choose labels and smart tools, click and drag at image pixels, accept suggestions, submit;
each interactive step waits for its ``/predict`` on the :class:`RecordingProxy` and for the editor to show it.
:func:`editing` sets up a project with one image, opens it and keeps the record of the session."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np

from e2e.browser import WAIT_S, wait
from e2e.recording_proxy import RecordingProxy
from e2e.servers import LabelStudio
from ml_backend.formats import region_mask


class Editor:
    """The annotator's hands: labels, smart tools, clicks at image pixels; a screenshot after each step."""

    def __init__(self, driver, folder: Path, proxy: RecordingProxy, config: str, size: tuple[int, int], *,
                 label_studio: LabelStudio, project_id: int, task_id: int) -> None:
        self.driver, self.folder, self.proxy, self.config = driver, folder, proxy, config
        self.width, self.height = size  # the task image's
        self.label_studio, self.project_id, self.task_id = label_studio, project_id, task_id
        self.steps: list[tuple[str, dict, int, dict]] = []
        self.accepted = np.zeros((self.height, self.width), bool)  # what the accepted suggestions cover
        self._shots = 0

    def shot(self, name: str) -> None:
        self._shots += 1
        self.driver.save_screenshot(str(self.folder / f"{self._shots:02d}-{name}.png"))

    def js(self, script: str):
        return self.driver.execute_script(script)

    def find(self, css: str):
        from selenium.webdriver.common.by import By

        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def open_task(self, url: str) -> None:
        self.driver.get(url)
        wait(self.driver, lambda d: self.find(".konvajs-content") and self.find(
            "[data-testid=bottombar-auto-annotation-toggle]") and self.js(
            "return !!(window.Htx && Htx.annotationStore.selected) && Array.from(document.images).some("
            f"i => i.complete && i.naturalWidth === {self.width} && i.getBoundingClientRect().width > 200)"),
            "the editor and its image")
        self.shot("task-open")

    def auto_annotation(self) -> None:
        [toggle] = self.find("[data-testid=bottombar-auto-annotation-toggle]")
        if not self.js("return Htx.autoAnnotation"):  # the editor keeps it on in localStorage between tasks
            toggle.click()
        wait(self.driver, lambda d: self.js("return Htx.autoAnnotation"), "Auto-Annotation on")
        self.shot("auto-annotation")

    def smart_tool(self, name: str) -> None:
        """The editor's Auto-Detect button cycles through the smart tools: press it until ``name`` is on."""
        for _ in range(6):
            if self.find(f"button.lsf-tool_smart.lsf-tool_active[aria-label={name}]"):
                return
            shown = [b for b in self.find(f"button.lsf-tool_smart[aria-label={name}]") if b.is_displayed()]
            if shown:  # the Auto-Detect button's menu is open (the pointer rests on it)
                shown[0].click()
                continue
            [auto_detect] = [b for b in self.find("button.lsf-tool_smart:not([aria-label])") if b.is_displayed()]
            auto_detect.click()
        raise AssertionError(f"the smart {name} could not be selected")

    def label(self, text: str, control: str) -> None:
        """Select label ``text`` of the control tag named ``control``: tags share label names, and the
        editor lists each tag's labels in the config's order."""
        holders = [tag.get("name") for tag in ET.fromstring(self.config).iter()
                   if any(label.get("value") == text for label in tag.findall("Label"))]
        element = [e for e in self.find(".lsf-label") if e.text.split("\n")[0] == text][holders.index(control)]
        if "lsf-label_selected" not in element.get_attribute("class"):
            element.click()
        wait(self.driver, lambda d: "lsf-label_selected" in element.get_attribute("class"), f"label {text}")

    def _offset(self, x: float, y: float) -> tuple[float, float]:
        [stage] = self.find(".konvajs-content")
        rect = stage.rect
        return x * rect["width"] / self.width - rect["width"] / 2, y * rect["height"] / self.height - rect["height"] / 2

    def _answered(self, name: str, action: Callable[[], None]) -> dict:
        """Do ``action``, wait for its /predict and for the editor to show the answer; record the step."""
        before = len(self.proxy.interactive())
        action()
        recorded = self.proxy.wait_for_count(before + 1, WAIT_S)
        assert len(recorded) == before + 1, f"{name}: the editor sent {len(recorded) - before} requests, not 1"
        request, status, answer = recorded[-1]
        self.steps.append((name, request, status, answer))
        assert status == 200, f"{name}: the backend answered {status}: {answer}"
        wait(self.driver, lambda d: self.js(
            "return !Htx.awaitingSuggestions && Htx.annotationStore.selected.suggestions.size > 0"),
            f"the suggestion after {name}")
        self.shot(name)
        return request

    def click(self, name: str, x: float, y: float, *, alt: bool = False) -> dict:
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.keys import Keys

        def act() -> None:
            [stage] = self.find(".konvajs-content")
            chain = ActionChains(self.driver)
            if alt:
                chain.key_down(Keys.ALT)
            chain.move_to_element_with_offset(stage, *self._offset(*self.free(x, y))).click()
            if alt:
                chain.key_up(Keys.ALT)
            chain.perform()

        return self._answered(name, act)

    def drag(self, name: str, start: tuple[float, float], end: tuple[float, float]) -> dict:
        from selenium.webdriver.common.action_chains import ActionChains

        def act() -> None:
            [stage] = self.find(".konvajs-content")
            middle = ((start[0] + end[0]) / 2, (start[1] + end[1]) / 2)
            (ActionChains(self.driver)
             .move_to_element_with_offset(stage, *self._offset(*start)).click_and_hold()
             .move_to_element_with_offset(stage, *self._offset(*middle))
             .move_to_element_with_offset(stage, *self._offset(*end)).release().perform())

        return self._answered(name, act)

    def type_phrase(self, name: str, control: str, text: str) -> dict:
        """Type ``text`` into the TextArea named ``control`` and press Enter (a one-row TextArea submits it)."""
        from selenium.webdriver.common.keys import Keys

        def act() -> None:
            [box] = self.find(f"input[name={control}], textarea[name={control}]")
            box.send_keys(text, Keys.ENTER)

        return self._answered(name, act)

    def hotkey(self, *keys: str) -> None:
        from selenium.webdriver.common.action_chains import ActionChains

        chain = ActionChains(self.driver)
        for key in keys[:-1]:
            chain.key_down(key)
        chain.send_keys(keys[-1])
        for key in keys[:-1]:
            chain.key_up(key)
        chain.perform()

    def regions(self) -> list[dict]:
        return self.js("return Htx.annotationStore.selected.regions.map(r => "
                       "({id: r.id, type: r.type, label: r.labelName, dynamic: r.dynamic, hidden: r.hidden}))")

    def hide_pending_rectangles(self) -> None:
        """Hide the smart rectangles (the eye in the Regions panel does the same): a click inside a pending
        one selects it instead of placing a keypoint."""
        self.hotkey("u")
        self.js("Htx.annotationStore.selected.regions.forEach(r => { "
                "if (r.dynamic && r.type === 'rectangleregion' && !r.hidden) r.toggleHidden(); })")
        wait(self.driver, lambda d: all(r["hidden"] for r in self.regions() if r["type"] == "rectangleregion"),
             "the rectangles hidden")

    def free(self, x: float, y: float) -> tuple[float, float]:
        """The nearest pixel to (x, y) that no accepted region covers (with a margin): a click on a region
        selects it instead of placing a keypoint."""
        taken = cv2.dilate(self.accepted.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
        if not taken[int(y), int(x)]:
            return x, y
        ys, xs = np.nonzero(~taken)
        assert len(xs), "no free pixel left to click"
        nearest = int(np.argmin((xs - x) ** 2 + (ys - y) ** 2))
        return float(xs[nearest]) + 0.5, float(ys[nearest]) + 0.5

    def accept(self, name: str) -> None:
        for item in self.steps[-1][3]["results"][0]["result"]:
            self.accepted |= region_mask(item, (self.width, self.height), max_pixels=10**7)
        [button] = self.find("[data-testid=bottombar-accept-suggestions-button]")
        button.click()
        wait(self.driver, lambda d: self.js("return Htx.annotationStore.selected.suggestions.size === 0 && "
                                            "!Htx.annotationStore.selected.regions.some(r => r.dynamic)"),
             f"{name} accepted")
        self.shot(f"accept-{name}")

    def suggestions_shown(self, count: int, what: str) -> None:
        wait(self.driver, lambda d: self.js("return Htx.annotationStore.selected.suggestions.size") == count, what)

    def submit(self) -> list[dict]:
        """Submit; the result of the task's first annotation, read back once Label Studio has stored it."""
        [button] = self.find("[data-testid=bottombar-submit-button]")
        button.click()
        self.shot("submit")

        def stored() -> list | None:
            annotations = self.label_studio.ok("GET", f"/api/tasks/{self.task_id}/annotations")
            return annotations[0]["result"] if annotations else None

        return wait(self.driver, lambda d: stored(), "the submitted annotation")

    def save_record(self) -> None:
        """The browser's console and every recorded request with its answer, beside the screenshots."""
        (self.folder / "console.json").write_text(json.dumps(self.driver.get_log("browser"), indent=1))
        (self.folder / "requests.json").write_text(json.dumps([
            {"step": name, "request": request, "status": status, "answer": answer}
            for name, request, status, answer in self.steps], indent=1))


@contextmanager
def editing(driver, proxy: RecordingProxy, label_studio: LabelStudio, folder: Path, *, title: str, config: str,
            image: tuple[str, bytes], size: tuple[int, int], backend_title: str = "sam") -> Iterator[Editor]:
    """A new project ``title`` connected to the backend through ``proxy``, with one task of ``image`` (file name,
    bytes; ``size`` pixels), opened in the editor with Auto-Annotation on. A failure inside leaves a screenshot;
    the console and the recorded requests are saved either way."""
    project = label_studio.ok("POST", "/api/projects", json={"title": title, "label_config": config})
    label_studio.ok("POST", "/api/ml", json={"url": proxy.url, "project": project["id"], "is_interactive": True,
                                             "title": backend_title})
    [task_id] = label_studio.ok("POST", f"/api/projects/{project['id']}/import?return_task_ids=true",
                                files={"image": image})["task_ids"]
    editor = Editor(driver, folder, proxy, config, size, label_studio=label_studio, project_id=project["id"],
                    task_id=task_id)
    try:
        editor.open_task(f"{label_studio.url}/projects/{project['id']}/data?task={task_id}")
        editor.auto_annotation()
        yield editor
    except Exception:
        editor.shot("failure")
        raise
    finally:
        editor.save_record()
