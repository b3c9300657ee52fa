"""The docs site: built from the notebooks (`fastdcm-docs`), every page opened in headless Chromium.

Each page must load without JavaScript errors, every <img> must load with a non-zero size, every internal link (and
its #anchor) must resolve, no raw directive text (`#| `) may show, nothing may overflow horizontally at 1280 px, and
every exported name must have its doc entry. Screenshots of the index and two module pages go to
docs_out/screenshots (kept by CI). Chromium is Debian's (`apt-get install chromium`, done by .ci/run); playwright
only drives it (its own browser download is not used)."""
import os, re, ast, shutil, threading, functools, importlib
from html.parser import HTMLParser
from http.server import ThreadingHTTPServer, SimpleHTTPRequestHandler
from pathlib import Path
from urllib.parse import urlsplit, unquote
import pytest

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT/'docs_out'
CHROMIUM = shutil.which(os.environ.get('CHROMIUM', 'chromium')) or shutil.which('chromium-browser')
FLAGS = ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
         '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage']

pytest.importorskip('mkdocs', reason='the docs extra (pip install -e ".[docs]") is not installed')
sync_api = pytest.importorskip('playwright.sync_api', reason='the docs extra (pip install -e ".[docs]") is not installed')


class _Ids(HTMLParser):
    "Element ids of an HTML page"
    def __init__(self):
        super().__init__(); self.ids = set()
    def handle_starttag(self, tag, attrs):
        for k,v in attrs:
            if k in ('id', 'name') and v: self.ids.add(v)

@functools.lru_cache(None)
def page_ids(path:Path) -> frozenset:
    p = _Ids(); p.feed(Path(path).read_text(errors='replace')); return frozenset(p.ids)

def site_pages(site:Path): return sorted(p for p in site.rglob('*.html') if p.name != '404.html')


class Server:
    "The site over loopback HTTP (the search index can't load from file://)"
    def __init__(self, site):
        handler = functools.partial(_QuietHandler, directory=str(site))
        self.httpd = ThreadingHTTPServer(('127.0.0.1', 0), handler)
        self.url = f'http://127.0.0.1:{self.httpd.server_address[1]}/'
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
    def close(self): self.httpd.shutdown(); self.httpd.server_close()

class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args): pass


_PAGE_JS = """() => {
  const imgs = [...document.images].map(i => ({src: i.getAttribute('src'), ok: i.complete && i.naturalWidth > 0 && i.naturalHeight > 0,
                                               alt: i.getAttribute('alt')}));
  const links = [...document.querySelectorAll('a[href]')].map(a => a.href);
  const text = document.body.innerText;
  const wide = [...document.querySelectorAll('body *')].filter(e => e.getBoundingClientRect().right > window.innerWidth + 1
                 && getComputedStyle(e).position !== 'fixed' && e.offsetParent !== null).slice(0, 3).map(e => e.tagName + '.' + e.className);
  return {imgs, links, text, scrollWidth: document.documentElement.scrollWidth, innerWidth: window.innerWidth, wide};
}"""

def check_page(page, url:str, site:Path, base:str) -> list:
    "Problems found on the page at `url` (an empty list when it passes)"
    errors, problems = [], []
    page.on('pageerror', lambda e: errors.append(f'JS error: {e}'))
    page.on('console', lambda m: errors.append(f'console {m.type}: {m.text}') if m.type == 'error' else None)
    # nothing leaves the machine: a page that fetches fonts, scripts or API data from the internet is a defect here
    page.on('request', lambda q: errors.append(f'request outside the site: {q.url}')
            if not q.url.startswith((base, 'data:', 'blob:', 'about:')) else None)
    resp = page.goto(url, wait_until='load')
    if resp is None or not resp.ok: problems.append(f'{url}: HTTP {resp.status if resp else "no response"}')
    page.wait_for_timeout(150)   # late script errors
    r = page.evaluate(_PAGE_JS)
    problems += [f'{url}: {e}' for e in errors]
    problems += [f'{url}: image does not load: {i["src"]}' for i in r['imgs'] if not i['ok']]
    problems += [f'{url}: image without alt text: {i["src"]}' for i in r['imgs'] if not (i['alt'] or '').strip()]
    if '#| ' in r['text']: problems.append(f'{url}: raw directive text: ...{r["text"][max(0, r["text"].index("#| ")-60):][:120]!r}')
    if r['scrollWidth'] > r['innerWidth']:
        problems.append(f'{url}: overflows horizontally ({r["scrollWidth"]} > {r["innerWidth"]} px): {r["wide"]}')
    for href in r['links']:
        if not href.startswith(base): continue
        u = urlsplit(href)
        rel = unquote(u.path[len(urlsplit(base).path):]) or 'index.html'
        tgt = site/rel
        if tgt.is_dir(): tgt = tgt/'index.html'
        if not tgt.exists(): problems.append(f'{url}: broken link {href}'); continue
        if u.fragment and tgt.suffix == '.html' and unquote(u.fragment) not in page_ids(tgt):
            problems.append(f'{url}: link to a missing anchor {href}')
    return problems


def _assigned(modname) -> set:
    "Public names a module assigns at top level (its constants), from its source"
    tree = ast.parse(Path(importlib.import_module(modname).__file__).read_text())
    res = set()
    for n in tree.body:
        if isinstance(n, (ast.Assign, ast.AnnAssign)):
            for t in (n.targets if isinstance(n, ast.Assign) else [n.target]):
                if isinstance(t, ast.Name) and not t.id.startswith('_'): res.add(t.id)
    return res

def undocumented(site:Path) -> list:
    "Exported names (each module's `__all__`, defined there) without a doc entry (page + anchor) in `site`"
    from fastdcm._modidx import d
    from fastdcm.docs import nbdev_slug
    missing = []
    for modname, syms in d['syms'].items():
        if not modname.startswith('fastdcm.'): continue
        mod, consts = importlib.import_module(modname), _assigned(modname)
        page_of_mod = site/next(iter(syms.values()))[0].partition('#')[0] if syms else None
        for name in getattr(mod, '__all__', []):
            entry = syms.get(f'{modname}.{name}')
            if entry is None:
                if name not in consts: continue            # re-exported from elsewhere (fastdcm.all)
                entry = (f'{page_of_mod.name if page_of_mod else "?"}#{nbdev_slug(name)}',)   # a constant: an entry on its module's page
            page, _, anchor = entry[0].partition('#')
            p = site/page
            if not p.exists() or anchor not in page_ids(p): missing.append(f'{modname}.{name} -> {entry[0]}')
    return missing


@pytest.fixture(scope='module')
def site():
    from fastdcm.docs import build_docs
    return build_docs(OUT)

@pytest.fixture(scope='module')
def browser():
    if CHROMIUM is None:
        if os.environ.get('CI'): pytest.fail("CI must install Debian's chromium (.ci/run does: apt-get install chromium)")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        yield b
        b.close()


def test_site_has_a_page_per_notebook(site):
    from nbdev.config import get_config
    nbs = get_config().nbs_path
    n = len([p for p in nbs.rglob('*.ipynb') if not any(q.startswith(('_', '.')) for q in p.relative_to(nbs).parts)])
    assert len(site_pages(site)) >= n, (len(site_pages(site)), n)
    for p in ('index.html', 'core.html', 'pixels.html', 'cli.html', 'llms.txt', 'core.html.md'): assert (site/p).exists(), p

def test_every_export_has_a_doc_entry(site):
    assert undocumented(site) == []

def test_no_private_helper_documented(site):
    from fastdcm._modidx import d
    private = {k.split('.')[-1] for m in d['syms'].values() for k in m if k.split('.')[-1].startswith('_')
               and not k.split('.')[-1].startswith('__')}
    shown = {i for p in site_pages(site) for i in page_ids(p)}
    assert not {n.lower() for n in private} & shown

def test_every_page_in_chromium(site, browser):
    srv = Server(site)
    shots = OUT/'screenshots'; shots.mkdir(parents=True, exist_ok=True)
    problems = []
    try:
        ctx = browser.new_context(viewport={'width': 1280, 'height': 900})
        for p in site_pages(site):
            page = ctx.new_page()
            rel = p.relative_to(site).as_posix()
            problems += check_page(page, srv.url + rel, site, srv.url)
            if rel in ('index.html', 'pixels.html', 'core.html'): page.screenshot(path=str(shots/rel.replace('.html', '.png')))
            page.close()
        ctx.close()
    finally: srv.close()
    assert problems == [], '\n'.join(problems[:40])
    for s in ('index.png', 'pixels.png', 'core.png'): assert (shots/s).stat().st_size > 10_000


def test_checks_catch_broken_pages(site, browser, tmp_path):
    "The checks are not vacuous: a page with each defect fails each check, and a missing doc entry is noticed"
    bad = tmp_path/'site'
    shutil.copytree(site, bad)
    html = (bad/'cli.html').read_text()
    inject = ('<p>#| hide</p><img src="figures/nope.png" alt="gone"><a href="no_such_page.html">x</a>'
              '<a href="core.html#no-such-anchor">y</a><div style="width:3000px">wide</div>'
              '<script>throw new Error("boom")</script><img src="https://example.invalid/x.png" alt="remote">')
    (bad/'cli.html').write_text(html.replace('</article>', inject + '</article>', 1))
    srv = Server(bad)
    try:
        ctx = browser.new_context(viewport={'width': 1280, 'height': 900})
        problems = '\n'.join(check_page(ctx.new_page(), srv.url + 'cli.html', bad, srv.url))
        ctx.close()
    finally: srv.close()
    for what in ('raw directive text', 'image does not load', 'broken link', 'missing anchor', 'overflows', 'boom',
                 'request outside the site'):
        assert what in problems, (what, problems)
    core = (bad/'core.html').read_text()
    (bad/'core.html').write_text(core.replace('id="dcmread"', 'id="dcmread-gone"'))
    pix = (bad/'pixels.html').read_text()
    (bad/'pixels.html').write_text(pix.replace('id="dicom_windows"', 'id="dicom_windows-gone"'))
    page_ids.cache_clear()
    gone = undocumented(bad)
    assert any('fastdcm.core.dcmread' in m for m in gone) and any('fastdcm.pixels.dicom_windows' in m for m in gone), gone


def test_package_docs_list_every_module():
    "fastdcm.__doc__ and nbs/llms.txt (both written by nbdev-export) name every public module, with its summary"
    import pkgutil, fastdcm
    mods = [m.name for m in pkgutil.iter_modules(fastdcm.__path__) if not m.name.startswith('_')]
    llms = (ROOT/'nbs'/'llms.txt').read_text()
    assert len(mods) >= 11
    for m in mods:
        assert f'- `fastdcm.{m}`: ' in fastdcm.__doc__, m
        assert f'[fastdcm.{m}](https://fastdcm.github.io/fastdcm/{m}.html.md): ' in llms, m

def test_page_descriptions_complete(site):
    "Each module page opens with its notebook's whole description (nbdev's frontmatter kept only a wrapped one's first line)"
    import html, pkgutil, fastdcm
    for m in (m.name for m in pkgutil.iter_modules(fastdcm.__path__) if not m.name.startswith('_')):
        summ = ' '.join(importlib.import_module(f'fastdcm.{m}').__doc__.split('\n\n')[0].split()).replace('`', '')
        page = (site/f'{m}.html').read_text()
        quote = re.search(r'<blockquote>\s*<p>(.*?)</p>', page, re.S)
        assert quote and ' '.join(html.unescape(re.sub(r'<[^>]+>', '', quote[1])).split()) == summ, (m, quote and quote[1], summ)
