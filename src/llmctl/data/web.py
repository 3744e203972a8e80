"""Web collection: HTML pages out of Common Crawl WARC files, and their main text.

Main-text extraction uses trafilatura in precision mode, as FineWeb does; boilerplate
(navigation, footers, cookie banners) is left behind.

Example:
    for n, url, html in iter_warc(Path("crawl.warc.gz")):
        text = html_to_text(html, url)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path


def iter_warc(path: Path) -> Iterator[tuple[int, str, bytes]]:
    """Yield (record number, target URL, HTML body) for each HTML `response` record."""
    from warcio.archiveiterator import ArchiveIterator

    with open(path, "rb") as f:
        for n, record in enumerate(ArchiveIterator(f), start=1):
            if record.rec_type != "response":
                continue
            ctype = (record.http_headers.get_header("Content-Type") or "").lower()
            if "html" not in ctype:
                continue
            url = (record.rec_headers.get_header("WARC-Target-URI") or "").strip("<>")
            yield n, url, record.content_stream().read()


def html_to_text(html: bytes | str, url: str | None = None) -> str | None:
    """The main text of an HTML page, or None when nothing readable is found."""
    import trafilatura

    return trafilatura.extract(
        html,
        url=url,
        favor_precision=True,
        include_comments=False,
        include_tables=True,
        deduplicate=False,
    )
