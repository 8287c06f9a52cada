"""What finish keeps of the years before: the tracks' polygons as WKB, the year before without GEOS polygons."""

import geopandas as gpd
import numpy as np
import shapely

from rtsmap.pipeline.inventory import change_summary, no_longer_seen
from rtsmap.pipeline.tracks import YearLinker, link_years
from rtsmap.workflows.run import _Before, _slumps_before

CRS = "EPSG:3413"


def _layer(boxes, uids):
    return gpd.GeoDataFrame({"UID": uids}, geometry=[shapely.box(*b) for b in boxes], crs=CRS)


def _years():
    y1 = _layer([(0, 0, 100, 100), (500, 0, 600, 100), (1000, 0, 1100, 100)], ["a", "b", "c"])
    # a grows, b is gone (its ground processed), c continues unchanged; d is new.
    y2 = _layer([(0, 0, 130, 130), (1000, 0, 1100, 100), (2000, 0, 2100, 100)], ["a2", "c2", "d"])
    return y1, y2


def test_linker_keeps_wkb_between_years_and_links_as_link_years():
    y1, y2 = _years()
    linker = YearLinker()
    first = linker.add(2021, y1)
    assert all(isinstance(g, bytes) for g in linker._tracks.last_geom + linker._tracks.first_geom)
    assert list(linker.last_wkb) == list(shapely.to_wkb(y1.geometry.values))
    second = linker.add(2022, y2)
    expected, table = link_years({2021: y1, 2022: y2})
    assert first.drop(columns="geometry").equals(expected[2021].drop(columns="geometry"))
    assert second.drop(columns="geometry").equals(expected[2022].drop(columns="geometry"))
    assert linker.table().equals(table)
    assert (table["retreat_m"].dropna() > 0).any()


def test_change_summary_from_the_slumps_before_equals_the_whole_year_before():
    y1, y2 = _years()
    linker = YearLinker()
    linked1 = linker.add(2021, y1)
    before = _Before(2021, linked1[["UID", "track_id", "change"]], linker.last_wkb, None, CRS)
    linked2 = linker.add(2022, y2)
    part = _slumps_before(before, linked2)
    assert list(part["UID"]) == ["b"]  # the only one not continued
    assert change_summary({2021: part, 2022: linked2}) == change_summary({2021: linked1, 2022: linked2})
    gone = no_longer_seen(linked1, linked2)
    assert np.array_equal(shapely.to_wkb(part.geometry.values[no_longer_seen(part, linked2)]),
                          shapely.to_wkb(linked1.geometry.values[gone]))
