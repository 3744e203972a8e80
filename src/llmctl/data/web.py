"""Web collection: HTML pages out of Common Crawl WARC files, and their main text.

Main-text extraction uses trafilatura in precision mode, as FineWeb does; boilerplate
(navigation, footers, cookie banners) is left behind.

Example:
    with open("crawl.warc.gz", "rb") as f:
        for n, url, html in iter_warc(f):
            text = html_to_text(html, url)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO


def iter_warc(f: BinaryIO) -> Iterator[tuple[int, str, bytes]]:
    """Yield (record number, target URL, HTML body) for each HTML `response` record of an
    open WARC file, raw bytes (warcio undoes the per-record gzip of .warc.gz itself)."""
    from warcio.archiveiterator import ArchiveIterator

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
