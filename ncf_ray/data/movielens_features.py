"""MovieLens side tables (issue 14 item 3): the movie and user files that ship beside the ratings, read into the
tables `features.encode_side_table` takes, with the options that say how each column is encoded.

  movielens-1m    movies.dat  MovieID::Title::Genres            (latin-1)  -> title words (text), year from the
                                                                              title's "(1995)" (numeric), genres
                                                                              split on '|' (bag)
                  users.dat   UserID::Gender::Age::Occupation::Zip         -> gender, age group, occupation code
                                                                              and the zip's first 3 characters,
                                                                              all categorical (age and occupation
                                                                              are codes, not quantities)
  movielens-100k  u.item      id|title|release date|video date|url|19 genre flags  -> title words, year from the
                                                                              release date, the flagged genres
                                                                              (names from u.genre) as one bag
                  u.user      id|age|gender|occupation|zip                 -> age numeric (years), the rest
                                                                              categorical, zip prefix
  movielens-20m   movies.csv  movieId,title,genres (utf-8, header)         -> as movielens-1m; no user file

`directory` is what `ncf-ray prepare movielens-* --from` points at (a folder, the GroupLens zip, or the ratings
file itself: its folder is searched), or the cached download. A file that is not there gives None.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ncf_ray.data.features import SideOptions
from ncf_ray.data.schema import ITEM_COL, USER_COL
from ncf_ray.data.side_read import BAD_ROWS_KEY, SOURCE_KEY, read_delimited
from ncf_ray.data.sources import split_fields
from ncf_ray.errors import UserError

YEAR_RE = re.compile(r"\s*\((?P<year>\d{4})\)\s*$")  # "Toy Story (1995)" -> 1995, title "Toy Story"
# u.genre's names in flag order, for a folder that lacks u.genre.
ML100K_GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
                 "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
                 "War", "Western")
TITLE, YEAR, GENRES = "title", "year", "genres"
GENDER, AGE, OCCUPATION, ZIP3 = "gender", "age", "occupation", "zip3"

ITEM_OPTIONS = SideOptions(ITEM_COL, text_cols=(TITLE,), bag_cols=(GENRES,), numeric_cols=(YEAR,))
USER_OPTIONS_1M = SideOptions(USER_COL, categorical_cols=(GENDER, AGE, OCCUPATION, ZIP3))
USER_OPTIONS_100K = SideOptions(USER_COL, numeric_cols=(AGE,), categorical_cols=(GENDER, OCCUPATION, ZIP3))

# name -> (item file, user file, encoding)
FILES = {
    "movielens-1m": ("movies.dat", "users.dat", "latin-1"),
    "movielens-100k": ("u.item", "u.user", "latin-1"),
    "movielens-20m": ("movies.csv", None, "utf-8"),
}


def _member(directory: Path, name: str) -> bytes | None:
    """The bytes of file `name` under a folder (the shallowest copy), in a zip archive, or beside a file; or None."""
    if directory.is_file() and zipfile.is_zipfile(directory):
        with zipfile.ZipFile(directory) as zf:
            found = sorted((n for n in zf.namelist() if n.rsplit("/", 1)[-1] == name), key=lambda n: n.count("/"))
            return zf.read(found[0]) if found else None
    if directory.is_dir():
        found = sorted(directory.rglob(name), key=lambda p: (len(p.parts), str(p)))
        return found[0].read_bytes() if found else None
    beside = directory.parent / name  # the ratings file itself: only its own folder, never a walk above it
    return beside.read_bytes() if beside.is_file() else None


def _lines(data: bytes, encoding: str, sep: str, names: tuple[str, ...], source: str) -> tuple[pa.Table, int]:
    """Header-less lines split on the exact `sep` (MovieLens fields are never quoted) into text columns."""
    lines = [ln.rstrip("\r") for ln in data.decode(encoding).split("\n") if ln.strip()]
    table, bad = split_fields(pa.array(lines, pa.string()), sep, names)
    if table.num_rows == 0:
        raise UserError(f"{source}: no line has the {len(names)} fields {sep.join(names)}")
    return table, len(bad)


def _tagged(table: pa.Table, source: str, bad: int) -> pa.Table:
    return table.replace_schema_metadata({SOURCE_KEY: source.encode(), BAD_ROWS_KEY: str(bad).encode()})


def _split_title(titles: pa.Array) -> tuple[pa.Array, pa.Array]:
    """(title without its trailing "(year)", the year as float64 or null)."""
    year = pc.extract_regex(titles, YEAR_RE.pattern)
    years = pc.cast(pc.struct_field(year, [0]), pa.float64())
    return pc.replace_substring_regex(titles, pattern=YEAR_RE.pattern, replacement=""), years


def movies_table(data: bytes, sep: str, encoding: str, source: str, header: bool = False) -> pa.Table:
    """movies.dat (MovieID::Title::Genres) or movies.csv (with a header) -> item_id, title, year, genres."""
    if header:
        raw, bad = read_delimited(data.decode(encoding), sep)
        raw = raw.rename_columns([ITEM_COL, TITLE, GENRES][: raw.num_columns])
    else:
        raw, bad = _lines(data, encoding, sep, (ITEM_COL, TITLE, GENRES), source)
    title, year = _split_title(raw[TITLE].combine_chunks())
    # ml-20m writes "(no genres listed)" where 1m leaves nothing: both mean no genre.
    genres = pc.replace_substring(raw[GENRES].combine_chunks(), "(no genres listed)", "")
    return _tagged(pa.table({ITEM_COL: raw[ITEM_COL], TITLE: title, YEAR: year, GENRES: genres}), source, bad)


def users_1m_table(data: bytes, source: str) -> pa.Table:
    """users.dat (UserID::Gender::Age::Occupation::Zip-code) -> user_id, gender, age, occupation, zip3."""
    raw, bad = _lines(data, "latin-1", "::", (USER_COL, GENDER, AGE, OCCUPATION, "zip"), source)
    return _tagged(pa.table({USER_COL: raw[USER_COL], GENDER: raw[GENDER], AGE: raw[AGE],
                             OCCUPATION: raw[OCCUPATION], ZIP3: pc.utf8_slice_codeunits(raw["zip"], 0, 3)}),
                   source, bad)


def _genre_names(directory: Path) -> tuple[str, ...]:
    """u.genre's names by flag index ('name|index' lines), or the published list when the file is absent."""
    data = _member(directory, "u.genre")
    if data is None:
        return ML100K_GENRES
    pairs = [ln.rsplit("|", 1) for ln in data.decode("latin-1").splitlines() if "|" in ln]
    names = dict((int(i), n) for n, i in pairs if i.strip().isdigit())
    return tuple(names[k] for k in sorted(names))


def items_100k_table(data: bytes, genres: tuple[str, ...], source: str) -> pa.Table:
    """u.item (id|title|release date|video release date|IMDb URL|one 0/1 flag per genre) -> item_id, title,
    year (from the release date 'dd-Mon-yyyy'), genres (list of the flagged genre names)."""
    flags = tuple(f"g{k}" for k in range(len(genres)))
    raw, bad = _lines(data, "latin-1", "|", (ITEM_COL, TITLE, "release", "video", "url") + flags, source)
    title, title_year = _split_title(raw[TITLE].combine_chunks())
    release = pc.extract_regex(raw["release"].combine_chunks(), r"(?P<y>\d{4})\s*$")
    year = pc.coalesce(pc.cast(pc.struct_field(release, [0]), pa.float64()), title_year)
    on = np.stack([np.asarray(raw[f].to_pylist()) == "1" for f in flags], axis=1)
    bags = [[genres[k] for k in np.flatnonzero(row)] for row in on]
    return _tagged(pa.table({ITEM_COL: raw[ITEM_COL], TITLE: title, YEAR: year,
                             GENRES: pa.array(bags, pa.list_(pa.string()))}), source, bad)


def users_100k_table(data: bytes, source: str) -> pa.Table:
    """u.user (id|age|gender|occupation|zip) -> user_id, age, gender, occupation, zip3."""
    raw, bad = _lines(data, "latin-1", "|", (USER_COL, AGE, GENDER, OCCUPATION, "zip"), source)
    return _tagged(pa.table({USER_COL: raw[USER_COL], AGE: raw[AGE], GENDER: raw[GENDER],
                             OCCUPATION: raw[OCCUPATION], ZIP3: pc.utf8_slice_codeunits(raw["zip"], 0, 3)}),
                   source, bad)


def movielens_side_tables(name: str, directory: str | Path) -> tuple[pa.Table | None, pa.Table | None,
                                                                     SideOptions, SideOptions]:
    """(items table or None, users table or None, options for items, options for users) of a MovieLens release
    found in `directory` (a folder, the zip, or the ratings file). A table whose file is absent is None."""
    if name not in FILES:
        raise UserError(f"no MovieLens side tables for {name!r}: expected one of {', '.join(FILES)}")
    item_file, user_file, encoding = FILES[name]
    root = Path(directory).expanduser()
    if not root.exists():
        raise UserError(f"path not found: {root}")
    items_data = _member(root, item_file)
    users_data = _member(root, user_file) if user_file else None
    items = users = None
    if name == "movielens-100k":
        if items_data is not None:
            items = items_100k_table(items_data, _genre_names(root), item_file)
        if users_data is not None:
            users = users_100k_table(users_data, user_file)
        return items, users, ITEM_OPTIONS, USER_OPTIONS_100K
    if items_data is not None:
        csv = item_file.endswith(".csv")
        items = movies_table(items_data, "," if csv else "::", encoding, item_file, header=csv)
    if users_data is not None:
        users = users_1m_table(users_data, user_file)
    return items, users, ITEM_OPTIONS, USER_OPTIONS_1M
