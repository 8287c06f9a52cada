"""Tests for pipeline.aoi: formats, CRSs, repair, the antimeridian, the pole, and every refusal."""

import json
import math

import geopandas as gpd
import pytest
import shapely
from pyproj import Transformer
from shapely.geometry import LineString, MultiPolygon, Point, Polygon, box, mapping

from rtsmap.pipeline.aoi import AOI, read_aoi
from rtsmap.pipeline.errors import AOIError, ConfigError

TO_3413 = Transformer.from_crs("EPSG:4326", "EPSG:3413", always_xy=True)

# A small AOI on the Peel Plateau (the demo region), in lon/lat.
PEEL = box(-135.4, 67.3, -135.2, 67.5)


def write_geojson(path, *geometries):
    """A FeatureCollection without a "crs" member, as RFC 7946 wants (so: WGS84)."""
    features = [{"type": "Feature", "properties": {"n": k},
                 "geometry": None if g is None else mapping(g)} for k, g in enumerate(geometries)]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def projected_area(lonlat_geometry):
    """Area in EPSG:3413 of a lon/lat geometry, via geopandas (densified first)."""
    densified = shapely.segmentize(lonlat_geometry, 0.01)
    return gpd.GeoSeries([densified], crs="EPSG:4326").to_crs("EPSG:3413").area.iloc[0]


def test_geojson_is_projected_to_the_grid_crs(tmp_path):
    aoi = read_aoi(write_geojson(tmp_path / "aoi.geojson", PEEL))
    assert isinstance(aoi, AOI)
    assert aoi.crs == "EPSG:3413" and aoi.source == str(tmp_path / "aoi.geojson")
    assert aoi.geometry.is_valid and aoi.geometry.geom_type == "Polygon"
    assert aoi.geometry.area == pytest.approx(projected_area(PEEL), rel=1e-4)
    assert aoi.geometry.contains(Point(*TO_3413.transform(-135.3, 67.4)))
    assert aoi.geometry_wgs84.equals(PEEL)
    assert aoi.bbox_wgs84 == pytest.approx((-135.4, 67.3, -135.2, 67.5))


def test_other_grid_crs(tmp_path):
    aoi = read_aoi(write_geojson(tmp_path / "aoi.geojson", PEEL), crs="EPSG:32608")
    assert aoi.crs == "EPSG:32608"
    x, y = Transformer.from_crs(4326, 32608, always_xy=True).transform(-135.3, 67.4)
    assert aoi.geometry.contains(Point(x, y))


def test_features_are_dissolved(tmp_path):
    a, b = box(-135.4, 67.3, -135.3, 67.5), box(-135.35, 67.3, -135.2, 67.4)
    aoi = read_aoi(write_geojson(tmp_path / "two.geojson", a, b, None))
    assert aoi.geometry.geom_type == "Polygon"
    assert aoi.geometry.area == pytest.approx(projected_area(a.union(b)), rel=1e-4)


def test_shapefile_in_grid_crs_is_kept_as_is(tmp_path):
    square = box(-2.0e6, 1.0e6, -1.99e6, 1.01e6)
    path = tmp_path / "aoi.shp"
    gpd.GeoDataFrame(geometry=[square], crs="EPSG:3413").to_file(path)
    aoi = read_aoi(path)
    assert aoi.geometry.equals(square)
    lon, lat = Transformer.from_crs(3413, 4326, always_xy=True).transform(-1.995e6, 1.005e6)
    assert aoi.geometry_wgs84.contains(Point(lon, lat))


def test_geopackage_with_two_layers_needs_a_chosen_one(tmp_path):
    path = tmp_path / "aoi.gpkg"
    utm = gpd.GeoSeries([PEEL], crs="EPSG:4326").to_crs("EPSG:32608")
    gpd.GeoDataFrame(geometry=utm).to_file(path, layer="aoi")
    gpd.GeoDataFrame(geometry=[Point(0, 0).buffer(1)], crs="EPSG:3413").to_file(path, layer="other")
    # Silently taking the first layer could map the wrong area: the error names the layers.
    with pytest.raises(AOIError, match=r"2 layers \(aoi, other\).*aoi.gpkg:LAYER"):
        read_aoi(path)
    with pytest.raises(AOIError, match="no layer 'nope'"):
        read_aoi(path, layer="nope")
    assert read_aoi(f"{path}:other").geometry.area == pytest.approx(Point(0, 0).buffer(1).area, rel=1e-6)
    aoi = read_aoi(path, layer="aoi")
    assert aoi.geometry.area == pytest.approx(projected_area(PEEL), rel=1e-3)
    assert aoi.geometry_wgs84.symmetric_difference(PEEL).area < 1e-3 * PEEL.area
    assert aoi.bbox_wgs84 == pytest.approx(PEEL.bounds, abs=1e-3)


def test_bow_tie_is_repaired(tmp_path):
    bow_tie = Polygon([(-135.4, 67.3), (-135.2, 67.5), (-135.2, 67.3), (-135.4, 67.5)])
    assert not bow_tie.is_valid
    aoi = read_aoi(write_geojson(tmp_path / "bowtie.geojson", bow_tie))
    assert aoi.geometry.is_valid and isinstance(aoi.geometry, MultiPolygon)
    assert len(aoi.geometry.geoms) == 2
    assert aoi.geometry.area == pytest.approx(projected_area(PEEL) / 2, rel=2e-2)


def test_antimeridian_ring_is_unwrapped_and_split(tmp_path):
    ring = [(179.5, 70.0), (-179.5, 70.0), (-179.5, 70.5), (179.5, 70.5)]
    hole = [(-179.8, 70.2), (-179.6, 70.2), (-179.6, 70.3), (-179.8, 70.3)]
    aoi = read_aoi(write_geojson(tmp_path / "am.geojson", Polygon(ring, [hole])))
    # Polar stereographic is symmetric about the pole: same area as the box at longitude 0.
    expected = projected_area(box(-0.5, 70.0, 0.5, 70.5)) - projected_area(
        box(0.2, 70.2, 0.4, 70.3))
    assert aoi.geometry.area == pytest.approx(expected, rel=1e-4)
    assert aoi.geometry.geom_type == "Polygon" and len(aoi.geometry.interiors) == 1
    assert aoi.geometry.contains(Point(*TO_3413.transform(180.0, 70.25)))
    assert not aoi.geometry.contains(Point(*TO_3413.transform(-179.7, 70.25)))  # the hole
    # For STAC: two pieces meeting at +/-180, one degree wide in all, minus the hole.
    wgs = aoi.geometry_wgs84
    assert isinstance(wgs, MultiPolygon) and len(wgs.geoms) == 2
    assert wgs.bounds[0] == pytest.approx(-180.0) and wgs.bounds[2] == pytest.approx(180.0)
    assert wgs.area == pytest.approx(0.5 - 0.02)
    assert aoi.bbox_wgs84 == pytest.approx((179.5, 70.0, -179.5, 70.5))


def test_projected_aoi_across_the_antimeridian_is_split(tmp_path):
    x, y = TO_3413.transform(180.0, 72.0)
    path = tmp_path / "am.gpkg"
    gpd.GeoDataFrame(geometry=[Point(x, y).buffer(20e3)], crs="EPSG:3413").to_file(path)
    aoi = read_aoi(path)
    wgs = aoi.geometry_wgs84
    assert isinstance(wgs, MultiPolygon) and len(wgs.geoms) == 2
    west, south, east, north = aoi.bbox_wgs84
    assert 179.0 < west < 180.0 and -180.0 < east < -179.0 and 71.5 < south < north < 72.5


def test_polar_cap_contains_the_pole(tmp_path):
    cap = box(-180.0, 85.0, 180.0, 90.0)
    aoi = read_aoi(write_geojson(tmp_path / "cap.geojson", cap))
    assert aoi.geometry.is_valid and aoi.geometry.geom_type == "Polygon"
    assert aoi.geometry.contains(Point(0.0, 0.0))
    # A disc of the projected radius of latitude 85 (densified to 0.1 degree).
    x, y = TO_3413.transform(10.0, 85.0)
    assert aoi.geometry.area == pytest.approx(math.pi * (x * x + y * y), rel=1e-4)
    assert aoi.geometry_wgs84.equals(cap)
    assert aoi.bbox_wgs84 == pytest.approx((-180.0, 85.0, 180.0, 90.0))


def test_projected_aoi_around_the_pole(tmp_path):
    path = tmp_path / "pole.gpkg"
    gpd.GeoDataFrame(geometry=[Point(0, 0).buffer(100e3, quad_segs=64)],
                     crs="EPSG:3413").to_file(path)
    aoi = read_aoi(path)
    _, lat = Transformer.from_crs(3413, 4326, always_xy=True).transform(100e3, 0.0)
    assert aoi.geometry_wgs84.bounds == pytest.approx((-180.0, lat, 180.0, 90.0), abs=1e-3)


def test_wedge_touching_the_pole_is_not_a_cap(tmp_path):
    wedge = Polygon([(0.0, 80.0), (30.0, 80.0), (30.0, 90.0), (0.0, 90.0)])
    aoi = read_aoi(write_geojson(tmp_path / "wedge.geojson", wedge))
    assert aoi.geometry_wgs84.equals(wedge)
    assert aoi.geometry.area == pytest.approx(projected_area(wedge), rel=1e-3)


# ---- refusals -------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    with pytest.raises(AOIError, match="does not exist"):
        read_aoi(tmp_path / "nope.geojson")


@pytest.mark.parametrize("name", ["aoi.geojson", "aoi.gpkg"])
def test_unreadable_file(tmp_path, name):
    (tmp_path / name).write_bytes(b"this is not a vector file\x00\x01")
    with pytest.raises(AOIError, match="cannot read AOI file"):
        read_aoi(tmp_path / name)


def test_no_features(tmp_path):
    path = write_geojson(tmp_path / "empty.geojson")
    with pytest.raises(AOIError, match="no features"):
        read_aoi(path)


def test_empty_geopackage_layer(tmp_path):
    path = tmp_path / "empty.gpkg"
    gpd.GeoDataFrame(geometry=gpd.GeoSeries([], crs="EPSG:3413")).to_file(path)
    with pytest.raises(AOIError, match="no features"):
        read_aoi(path)


def test_only_empty_geometries(tmp_path):
    path = write_geojson(tmp_path / "nulls.geojson", None, Polygon())
    with pytest.raises(AOIError, match="empty or null"):
        read_aoi(path)


@pytest.mark.parametrize("geometry", [Point(-135.3, 67.4),
                                      LineString([(-135.4, 67.3), (-135.2, 67.5)])])
def test_points_and_lines_are_refused(tmp_path, geometry):
    path = write_geojson(tmp_path / "x.geojson", PEEL, geometry)
    with pytest.raises(AOIError, match=f"feature 1 is a {geometry.geom_type}.*buffer"):
        read_aoi(path)


def test_collapsed_polygon_is_refused(tmp_path):
    flat = Polygon([(-135.0, 67.0), (-134.0, 68.0), (-133.0, 69.0), (-135.0, 67.0)])
    path = write_geojson(tmp_path / "flat.geojson", flat)
    with pytest.raises(AOIError, match="nothing polygonal"):
        read_aoi(path)


def test_shapefile_without_crs_is_refused(tmp_path):
    path = tmp_path / "nocrs.shp"
    with pytest.warns(UserWarning, match="'crs' was not provided"):  # that is the point
        gpd.GeoDataFrame(geometry=[box(0, 0, 1000, 1000)]).to_file(path)
    assert not (tmp_path / "nocrs.prj").exists()
    with pytest.raises(AOIError, match="has no CRS"):
        read_aoi(path)


def test_aoi_outside_the_projection_is_refused(tmp_path):
    # The South Pole is at infinity in the north polar stereographic grid.
    path = write_geojson(tmp_path / "south.geojson", box(-180.0, -90.0, 180.0, -80.0))
    with pytest.raises(AOIError, match="cannot be projected"):
        read_aoi(path)


@pytest.mark.parametrize("crs", ["EPSG:4326", "no such crs"])
def test_grid_crs_must_be_projected(tmp_path, crs):
    path = write_geojson(tmp_path / "aoi.geojson", PEEL)
    with pytest.raises(ConfigError):
        read_aoi(path, crs=crs)


# --- hostile input: property-based ------------------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from rtsmap.pipeline.errors import RtsmapError  # noqa: E402

_NUMBER = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.floats(-200, 200),
    st.sampled_from([0.0, 90.0, -90.0, 180.0, -180.0, 1e300, -1e300]),
    st.integers(-10**6, 10**6),
)
_POSITION = st.lists(_NUMBER, min_size=0, max_size=4)
_RING = st.lists(_POSITION, min_size=0, max_size=7)
_GEOMETRY = st.one_of(
    st.fixed_dictionaries({"type": st.just("Polygon"), "coordinates": st.lists(_RING, max_size=3)}),
    st.fixed_dictionaries({"type": st.just("MultiPolygon"),
                           "coordinates": st.lists(st.lists(_RING, max_size=2), max_size=2)}),
    st.fixed_dictionaries({"type": st.sampled_from(["Point", "LineString", "GeometryCollection", "Nonsense"]),
                           "coordinates": st.one_of(_POSITION, _RING)}),
    st.none(),
    st.text(max_size=5),
)
_FEATURE = st.fixed_dictionaries({"type": st.sampled_from(["Feature", "Feature", "feature"]),
                                  "properties": st.one_of(st.none(), st.dictionaries(st.text(max_size=3), _NUMBER, max_size=2)),
                                  "geometry": _GEOMETRY})
_DOCUMENT = st.one_of(
    st.fixed_dictionaries({"type": st.just("FeatureCollection"), "features": st.lists(_FEATURE, max_size=3)}),
    _FEATURE,
    _GEOMETRY,
    st.lists(_NUMBER, max_size=3),
)


def _read_or_refuse(path):
    """read_aoi either returns a usable AOI or raises the project's error: nothing else."""
    try:
        aoi = read_aoi(path)
    except RtsmapError as exc:
        assert "\n" not in str(exc).strip(), "the message must be one line"
        return None
    assert aoi.geometry.is_valid and aoi.geometry.area > 0
    assert all(math.isfinite(v) for v in aoi.bbox_wgs84)
    return aoi


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=_DOCUMENT)
def test_random_geojson_never_raises_anything_but_aoierror(tmp_path, document):
    path = tmp_path / "random.geojson"
    path.write_text(json.dumps(document))  # NaN and Infinity as JS literals, as sloppy writers do
    _read_or_refuse(path)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300))
def test_random_bytes_never_raise_anything_but_aoierror(tmp_path, data):
    path = tmp_path / "random.geojson"
    path.write_bytes(data)
    _read_or_refuse(path)


def test_nan_vertex_is_an_aoierror(tmp_path):
    path = tmp_path / "nan.geojson"
    path.write_text('{"type": "Polygon", "coordinates": [[[-135.4, 67.3], [-135.2, NaN], '
                    '[-135.2, 67.5], [-135.4, 67.5], [-135.4, 67.3]]]}')
    with pytest.raises(AOIError, match="not a finite number"):
        read_aoi(path)
