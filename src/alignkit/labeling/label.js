// alignkit label: the labeling page's ranking controls, served as /label.js (the page's CSP allows no inline
// script). The list order is the ranking, best first: drag a response, or select one (arrow keys, click) and
// move it with u/d. Best/worst marks put a response in the top/bottom group (ties with the other marks); a
// "tie" mark shares the rank of the response above. Until the labeler orders anything (drag, u/d, tie), the
// unmarked responses tie: a submit without a decision must not turn screen position into preferences.
const form = document.getElementById('rank');
if (form) {
  const list = document.getElementById('responses');
  const cards = () => Array.from(list.querySelectorAll('.resp'));
  const box = (card, kind) => card.querySelector('input.' + kind);
  const num = (card) => Number(card.dataset.n);
  let ordered = false;
  let selected = cards()[0];
  let dragged = null;

  // Best-first groups of response numbers: the form the server's check_ranking validates.
  const ranking = () => {
    const marked = (kind) => cards().filter((c) => box(c, kind).checked);
    const middle = cards().filter((c) => !box(c, 'best').checked && !box(c, 'worst').checked);
    const groups = [];
    middle.forEach((c, k) => {
      if (k > 0 && (!ordered || box(c, 'tie').checked)) groups[groups.length - 1].push(num(c));
      else groups.push([num(c)]);
    });
    return [marked('best').map(num), ...groups, marked('worst').map(num)].filter((g) => g.length);
  };

  const paint = () => {
    cards().forEach((c, k) => {
      c.classList.toggle('best', box(c, 'best').checked);
      c.classList.toggle('worst', box(c, 'worst').checked);
      c.classList.toggle('selected', c === selected);
      box(c, 'tie').disabled = k === 0;  // the first response has nothing above to tie with
    });
    const text = ranking().map((g) => g.join(' = ')).join('  >  ');
    document.getElementById('preview').textContent = text;
  };

  const move = (card, before) => {  // put card before `before` (null: at the end), as its own rank
    if (card === before) return;
    list.insertBefore(card, before);
    box(card, 'tie').checked = false;
    ordered = true;
    paint();
  };

  const mark = (kind, card) => {  // best and worst exclude each other
    const on = box(card, kind);
    on.checked = !on.checked;
    if (on.checked) box(card, kind === 'best' ? 'worst' : 'best').checked = false;
    paint();
  };

  list.addEventListener('change', (e) => {
    if (e.target.classList.contains('tie')) ordered = true;
    const card = e.target.closest('.resp');
    if (e.target.checked && !e.target.classList.contains('tie')) {
      const other = e.target.classList.contains('best') ? 'worst' : 'best';
      box(card, other).checked = false;
    }
    paint();
  });
  list.addEventListener('click', (e) => {
    const card = e.target.closest('.resp');
    if (card) { selected = card; paint(); }
  });

  // HTML5 drag and drop: dropping on the upper half of a response puts the dragged one above it, else below.
  list.addEventListener('dragstart', (e) => {
    dragged = e.target.closest('.resp');
    e.dataTransfer.effectAllowed = 'move';
    e.dataTransfer.setData('text/plain', dragged.dataset.n);
  });
  list.addEventListener('dragover', (e) => { if (dragged) e.preventDefault(); });
  list.addEventListener('drop', (e) => {
    const target = e.target.closest('.resp');
    if (!dragged || !target) return;
    e.preventDefault();
    const rect = target.getBoundingClientRect();
    const above = e.clientY < rect.top + rect.height / 2;
    selected = dragged;
    move(dragged, above ? target : target.nextElementSibling);
  });
  list.addEventListener('dragend', () => { dragged = null; });

  form.addEventListener('submit', () => {
    document.getElementById('ranking').value = JSON.stringify(ranking());
  });

  document.addEventListener('keydown', (e) => {
    if (e.target.tagName === 'INPUT' && e.target.type !== 'checkbox') return;
    if (e.ctrlKey || e.metaKey || e.altKey) return;  // leave the browser's own shortcuts alone
    const all = cards();
    const at = all.indexOf(selected);
    const digit = /^Digit([1-9])$/.exec(e.code);
    const byNumber = digit && all.find((c) => num(c) === Number(digit[1]));
    if (byNumber) { mark(e.shiftKey ? 'worst' : 'best', byNumber); e.preventDefault(); }
    else if (e.key === 'ArrowUp' || e.key === 'ArrowDown') {
      selected = all[Math.min(all.length - 1, Math.max(0, at + (e.key === 'ArrowUp' ? -1 : 1)))];
      selected.scrollIntoView({ block: 'nearest' });
      paint();
      e.preventDefault();
    }
    else if (e.key === 'u' && at > 0) move(selected, all[at - 1]);
    else if (e.key === 'd' && at < all.length - 1) move(selected, all[at + 1].nextElementSibling);
    else if (e.key === 't' && at > 0) { box(selected, 'tie').click(); }
    else if (e.key === 's') document.getElementById('skip').click();
    else if (e.key === 'f') document.getElementById('flag').click();
    else if (e.key === 'Enter') { document.getElementById('submit').click(); e.preventDefault(); }
  });
  paint();
}
