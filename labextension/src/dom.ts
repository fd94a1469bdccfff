/** Minimal DOM patching: every setter writes only when the value changed (no flicker, no layout churn). */

export function h<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  className?: string,
  text?: string
): HTMLElementTagNameMap[K] {
  const el = document.createElement(tag);
  if (className) {
    el.className = className;
  }
  if (text !== undefined) {
    el.textContent = text;
  }
  return el;
}

export function setText(el: Element, text: string): void {
  if (el.textContent !== text) {
    el.textContent = text;
  }
}

export function setAttr(el: Element, name: string, value: string | null): void {
  if (value === null) {
    if (el.hasAttribute(name)) {
      el.removeAttribute(name);
    }
  } else if (el.getAttribute(name) !== value) {
    el.setAttribute(name, value);
  }
}

export function setClass(el: Element, name: string, on: boolean): void {
  if (el.classList.contains(name) !== on) {
    el.classList.toggle(name, on);
  }
}

export function setStyle(el: HTMLElement, prop: string, value: string): void {
  if (el.style.getPropertyValue(prop) !== value) {
    el.style.setProperty(prop, value);
  }
}

export function setHidden(el: HTMLElement, hidden: boolean): void {
  if (el.hidden !== hidden) {
    el.hidden = hidden;
  }
}

/**
 * Keeps `parent`'s children in the order of `wanted`, moving only the nodes that are out of place,
 * so a focused button or the scroll position is never disturbed by an update.
 */
export function reorder(parent: Element, wanted: Element[]): void {
  let cursor: ChildNode | null = parent.firstChild;
  for (const el of wanted) {
    if (cursor === el) {
      cursor = cursor.nextSibling;
    } else {
      parent.insertBefore(el, cursor);
    }
  }
  // whatever follows is stale
  while (cursor) {
    const next: ChildNode | null = cursor.nextSibling;
    parent.removeChild(cursor);
    cursor = next;
  }
}
