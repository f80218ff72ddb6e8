"""The batch source: positioned reads equal the stack's contents, streamed batches (with the
next batch read ahead) equal cached ones, shards split each half-set, truncated stacks say so."""
import os

import numpy as np
import pytest

from cryocv.backend import to_numpy
from cryocv.errors import CryocvError
from cryocv.fourier import ft2_centered
from cryocv.io.mrc import StackCache, write_stack
from cryocv.io.particle_files import load_particles
from cryocv.simulate import simulate
from cryocv.source import ParticleSource
from .conftest import blob_volume


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    root = tmp_path_factory.mktemp("source")
    return simulate(blob_volume(24, seed=4), 2.0, 61, str(root), snr=1.0, seed=2, progress=False)


def test_positioned_reads_equal_the_stack(tmp_path):
    images = np.random.default_rng(0).normal(size=(9, 8, 8)).astype(np.float32)
    path = str(tmp_path / "s.mrcs")
    write_stack(path, images, 1.0)
    cache = StackCache()
    wanted = np.array([7, 2, 3, 4, 0, 8, 3])            # unordered, with runs and a repeat
    out = np.empty((wanted.size, 8, 8), np.float32)
    cache.read(path, wanted, out)
    np.testing.assert_array_equal(out, images[wanted])
    with open(path, "r+b") as handle:                    # cut the last image in half
        handle.truncate(os.path.getsize(path) - 128)
    cache = StackCache()
    with pytest.raises(CryocvError, match="truncated"):
        cache.read(path, np.array([8]), np.empty((1, 8, 8), np.float32))
    cache.close()


def test_reads_in_parallel_parts_equal_one_read(simulated, monkeypatch, tmp_path):
    """read_images in parts of a few images, by several threads: the same array, and a NaN image
    in a later part is still reported by its particle number."""
    import cryocv.particles
    particles = simulated
    wanted = np.r_[np.arange(40, 61), np.arange(0, 30)][::-1]       # unordered, two runs
    whole = particles.read_images(wanted)
    monkeypatch.setattr(cryocv.particles, "READ_PART_BYTES", 3 * whole[0].nbytes)
    np.testing.assert_array_equal(particles.read_images(wanted), whole)
    images = particles.read_images()
    images[37, 5, 5] = np.nan
    path = str(tmp_path / "nan.mrcs")
    write_stack(path, images, particles.pixel_size_A)
    bad = particles.subset(np.arange(len(particles)))
    bad.stack_paths = np.full(len(bad), path, dtype=object)
    bad.stack_indices = np.arange(len(bad))
    with pytest.raises(CryocvError, match="particle 38 "):
        bad.read_images()


def test_streamed_batches_with_read_ahead_equal_cached_ones(simulated, xp):
    particles = load_particles(simulated.source)
    cached = ParticleSource(particles, xp, cache_budget_bytes=1 << 30)
    streamed = ParticleSource(load_particles(simulated.source), xp)
    filled_ahead = ParticleSource(load_particles(simulated.source), xp, cache_budget_bytes=1 << 30)
    assert cached.cached and not streamed.cached
    members = streamed.members(1)
    batches = [members[i:i + 7] for i in range(0, members.size, 7)]
    for i, index in enumerate(batches):
        got = streamed.load(index, 1)
        got_filled = filled_ahead.load(index, 1)
        if i + 1 < len(batches):                         # read ahead, as em_pass does (on the GPU into
            streamed.prefetch(batches[i + 1] if i % 3 else batches[i + 1][:3])  # page-locked buffers in turn);
            filled_ahead.prefetch(batches[i + 1])                               # sometimes a different set
        expected = cached.load(index, 1)
        np.testing.assert_array_equal(to_numpy(got.images_ft), to_numpy(expected.images_ft))
        np.testing.assert_array_equal(to_numpy(got_filled.images_ft), to_numpy(expected.images_ft))
        np.testing.assert_array_equal(to_numpy(got.images_ft),
                                      to_numpy(ft2_centered(xp.asarray(particles.read_images(index)))
                                               .astype(xp.complex64)))
        np.testing.assert_allclose(to_numpy(got.rotations), particles.rotations[index], atol=1e-6)
        np.testing.assert_allclose(to_numpy(got.origin_px), particles.origin_px[index], atol=1e-6)
    other_half = filled_ahead.members(2)                 # the last unread images: the read-ahead buffers go
    filled_ahead.prefetch(other_half)
    np.testing.assert_array_equal(to_numpy(filled_ahead.load(other_half, 2).images_ft),
                                  to_numpy(cached.load(other_half, 2).images_ft))


def test_shards_split_each_half_set(simulated, xp):
    particles = load_particles(simulated.source)
    for half in (1, 2):
        everyone = np.nonzero(particles.half_set == half)[0]
        shards = [ParticleSource(particles, xp, shard=(rank, 3)).members(half) for rank in range(3)]
        np.testing.assert_array_equal(np.concatenate(shards), everyone)
        assert max(s.size for s in shards) - min(s.size for s in shards) <= 1
    with pytest.raises(ValueError):
        ParticleSource(particles, xp, shard=(3, 3))
