"""The Scipion plugin, headless, in a temporary project (conftest sets up SCIPION_HOME):
particles simulated from a known map are imported from a RELION 3.1 STAR file with a
wrong (random) alignment, refined with ProtCryocvRefine, reconstructed with
ProtCryocvReconstruct, and the outputs are checked against the true map and poses;
ProtCryocvSubtract and ProtCryocvLocalRefine run on particles imported with true or perturbed
poses and half-sets; ProtCryocvAbinitio runs on a tiny set imported without poses or half-sets.
Skipped when the Scipion stack (``pip install cryocv[scipion]``) is not installed."""
import os

import numpy as np
import pytest

pytest.importorskip("pyworkflow")
pytest.importorskip("pwem")
pytest.importorskip("relion")

import starfile  # noqa: E402

from cryocv.fsc import fsc_curve, resolution_at  # noqa: E402
from cryocv.geometry import angular_distance_deg, matrix_to_euler, random_rotations  # noqa: E402
from cryocv.io.mrc import read_map, write_map  # noqa: E402
from cryocv.io.particle_files import load_particles  # noqa: E402
from cryocv.fourier import lowpass_map  # noqa: E402
from cryocv.simulate import simulate  # noqa: E402
from .conftest import asymmetric_map  # noqa: E402

BOX, PIXEL_A, N_PARTICLES = 32, 2.0, 300


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """truth.mrc, start.mrc (20 Å low-pass), sim/particles.star (true poses) and
    sim/particles_random_poses.star (the same images with random poses: what is imported)."""
    root = tmp_path_factory.mktemp("scipion_data")
    truth = asymmetric_map(BOX, seed=8)
    write_map(str(root / "truth.mrc"), truth, PIXEL_A)
    write_map(str(root / "start.mrc"), lowpass_map(truth, PIXEL_A, 20.0), PIXEL_A)
    simulate(truth, PIXEL_A, N_PARTICLES, str(root / "sim"), snr=0.3, seed=3, progress=False, shift_sigma_A=2.0)
    tables = starfile.read(str(root / "sim" / "particles.star"), always_dict=True)
    euler = matrix_to_euler(random_rotations(N_PARTICLES, np.random.default_rng(11)))
    for column, values in zip(["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"], euler.T):
        tables["particles"][column] = values
    starfile.write(tables, str(root / "sim" / "particles_random_poses.star"), overwrite=True)
    return root, truth


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    from pyworkflow.project import Manager
    manager = Manager()
    project = manager.createProject(f"cryocv_tests_{os.getpid()}")
    cwd = os.getcwd()
    os.chdir(project.getPath())  # protocols resolve their paths from the project folder
    yield project
    os.chdir(cwd)


def launch(project, protocol):
    project.launchProtocol(protocol, wait=True)
    if not protocol.isFinished():
        logs = [p for p in protocol.getLogPaths() if os.path.exists(p)]
        tails = "\n".join(open(p).read()[-3000:] for p in logs)
        pytest.fail(f"{protocol.getRunName()} did not finish ({protocol.getStatus()}):\n{tails}")
    return protocol


@pytest.fixture(scope="module")
def imported(project, dataset):
    """Particles imported from the RELION STAR (CTF, random alignment, half-sets) and the start map."""
    from pwem.protocols import ProtImportParticles, ProtImportVolumes
    root, _ = dataset
    particles = project.newProtocol(ProtImportParticles, objLabel="import particles from RELION",
                                    importFrom=ProtImportParticles.IMPORT_FROM_RELION,
                                    starFile=str(root / "sim" / "particles_random_poses.star"),
                                    samplingRate=PIXEL_A, voltage=300, sphericalAberration=2.7,
                                    amplitudeContrast=0.1)
    launch(project, particles)
    volume = project.newProtocol(ProtImportVolumes, objLabel="import start map",
                                 filesPath=str(root / "start.mrc"), samplingRate=PIXEL_A)
    launch(project, volume)
    return particles.outputParticles, volume.outputVolume


@pytest.fixture(scope="module")
def refined(project, imported):
    from cryocv.protocols import ProtCryocvRefine
    particles, reference = imported
    protocol = project.newProtocol(ProtCryocvRefine, objLabel="cryocv refine", maxIterations=2,
                                   initialLowpass=20.0, useGpu=False)
    protocol.inputParticles.set(particles)
    protocol.referenceVolume.set(reference)
    return launch(project, protocol)


def scipion_poses(particle_set, folder):
    """Poses of a Scipion SetOfParticles as cryocv Particles, through relion.convert's writer."""
    import relion.convert
    from pwem.constants import ALIGN_PROJ
    path = os.path.join(folder, f"{particle_set.getObjId()}_poses.star")
    relion.convert.writeSetOfParticles(particle_set, path, alignType=ALIGN_PROJ)
    return load_particles(path)


def vs_truth_A(path, truth):
    volume, _ = read_map(path)
    return resolution_at(fsc_curve(volume, truth), 0.5, BOX, PIXEL_A)


# ------------------------------------------------------------------------------------------- tests
def test_plugin_loads_with_protocols_viewers_bibtex_and_menu(tmp_path):
    from pyworkflow.plugin import Domain
    from pyworkflow.viewer import DESKTOP_TKINTER
    assert "cryocv" in Domain.getPlugins(), "Scipion did not load the cryocv plugin (import error?)"
    protocols = Domain.getProtocols()
    ours = {"ProtCryocvRefine", "ProtCryocvLocalRefine", "ProtCryocvReconstruct", "ProtCryocvSubtract",
            "ProtCryocvAbinitio"}
    assert ours <= set(protocols)
    for name in ("ProtCryocvRefine", "ProtCryocvLocalRefine", "ProtCryocvReconstruct", "ProtCryocvAbinitio"):
        viewers = Domain.findViewers(protocols[name].getClassName(), DESKTOP_TKINTER)
        assert "CryocvViewer" in [v.__name__ for v in viewers], name
    module = Domain.getPlugins()["cryocv"]
    assert {"Punjani2017", "Punjani2020", "Scheres2012", "Chen2013"} <= set(module._bibtex.keys())
    assert module.Plugin.getVar("CRYOCV_PYTHON")
    from pyworkflow.gui.project.viewprotocols_extra import ProtocolTreeConfig
    base = tmp_path / "base_protocols.conf"   # the menu must come from the plugin's own protocols.conf
    base.write_text("[PROTOCOLS]\nProtocols SPA = [\n ]\n")
    tree = ProtocolTreeConfig.load(Domain, str(base))
    section = next(c for c in tree["Protocols SPA"].childs if str(c.text) == "cryocv")
    assert {str(c.value) for c in section.childs} == ours


def test_plugin_runs_the_core_in_its_configured_environment(monkeypatch):
    import cryocv
    plugin = cryocv.Plugin
    monkeypatch.setitem(plugin._vars, "CRYOCV_PYTHON", "/opt/gpu-env/bin/python")
    monkeypatch.setitem(plugin._vars, "CRYOCV_ACTIVATION", "")
    assert plugin.getProgram() == "/opt/gpu-env/bin/python -m cryocv.cli"
    assert plugin.getProgram(gpu=True) == "CUDA_VISIBLE_DEVICES=%(GPU)s /opt/gpu-env/bin/python -m cryocv.cli"
    monkeypatch.setitem(plugin._vars, "CRYOCV_ACTIVATION", "source /opt/conda/bin/activate gpu")
    assert plugin.getProgram(gpu=True).startswith("source /opt/conda/bin/activate gpu && CUDA_VISIBLE_DEVICES=")



def test_core_command_runs_through_runjob_with_activation_and_gpus(monkeypatch, tmp_path):
    """pyworkflow's runJob (as protocols call it) runs the activation, then the core's python
    with the protocol's GPUs in CUDA_VISIBLE_DEVICES and the arguments intact."""
    import cryocv
    from pyworkflow.utils.process import runJob
    record = tmp_path / "record.txt"
    stub = tmp_path / "python"
    stub.write_text(f'#!/bin/sh\necho "$ACTIVATED|$CUDA_VISIBLE_DEVICES|$*" > {record}\n')
    stub.chmod(0o755)
    activate = tmp_path / "activate"
    activate.write_text("export ACTIVATED=yes\n")
    plugin = cryocv.Plugin
    monkeypatch.setitem(plugin._vars, "CRYOCV_PYTHON", str(stub))
    monkeypatch.setitem(plugin._vars, "CRYOCV_ACTIVATION", f"source {activate}")
    runJob(None, plugin.getProgram(gpu=True), ["refine", "--out", "a dir"], gpuList=[2, 3],
           executable="/bin/bash", env=plugin.getEnviron())
    assert record.read_text().strip() == "yes|2,3|-m cryocv.cli refine --out a dir"


def test_validate_catches_bad_inputs(project, imported, dataset, tmp_path):
    from pwem.protocols import ProtImportParticles, ProtImportVolumes
    from cryocv.protocols import ProtCryocvReconstruct, ProtCryocvRefine
    particles, reference = imported
    root, truth = dataset
    refine = project.newProtocol(ProtCryocvRefine, symmetryGroup="C4x")
    refine.inputParticles.set(particles)
    refine.referenceVolume.set(reference)
    assert any("Symmetry" in e for e in refine.validate())
    write_map(str(tmp_path / "big.mrc"), np.zeros((BOX + 8,) * 3, np.float32), PIXEL_A)
    big = launch(project, project.newProtocol(ProtImportVolumes, filesPath=str(tmp_path / "big.mrc"),
                                              samplingRate=PIXEL_A)).outputVolume
    refine = project.newProtocol(ProtCryocvRefine)
    refine.inputParticles.set(particles)
    refine.referenceVolume.set(big)
    assert any(f"{BOX + 8} px" in e and f"{BOX} px" in e for e in refine.validate())
    # particles without CTF (a STAR without defocus columns) and without alignment
    tables = starfile.read(str(root / "sim" / "particles.star"), always_dict=True)
    tables["particles"] = tables["particles"].drop(columns=[c for c in tables["particles"].columns
                                                            if c.startswith(("rlnDefocus", "rlnAngle",
                                                                             "rlnRandomSubset"))])
    starfile.write(tables, str(root / "sim" / "no_ctf.star"), overwrite=True)
    bare = launch(project, project.newProtocol(ProtImportParticles, importFrom=ProtImportParticles.IMPORT_FROM_RELION,
                                               starFile=str(root / "sim" / "no_ctf.star"), samplingRate=PIXEL_A))
    refine = project.newProtocol(ProtCryocvRefine)
    refine.inputParticles.set(bare.outputParticles)
    refine.referenceVolume.set(reference)
    assert any("no CTF" in e for e in refine.validate())
    reconstruct = project.newProtocol(ProtCryocvReconstruct)
    reconstruct.inputParticles.set(bare.outputParticles)
    assert any("no 3D alignment" in e for e in reconstruct.validate())
    # local refinement: particles without CTF, poses or half-sets, a map without half-maps, a mask of another box
    from pwem.protocols import ProtImportMask
    from cryocv.protocols import ProtCryocvLocalRefine
    write_map(str(tmp_path / "big_mask.mrc"), np.ones((BOX + 8,) * 3, np.float32), PIXEL_A)
    big_mask = launch(project, project.newProtocol(ProtImportMask, maskPath=str(tmp_path / "big_mask.mrc"),
                                                   samplingRate=PIXEL_A)).outputMask
    local = project.newProtocol(ProtCryocvLocalRefine)
    local.inputParticles.set(bare.outputParticles)
    local.inputVolume.set(big)
    local.refMask.set(big_mask)
    errors = local.validate()
    for expected in ("no CTF", "no 3D alignment", "no half-sets (_rlnRandomSubset)", "The map has no half-maps",
                     f"The mask is {BOX + 8} px, the particles {BOX} px", f"The map is {BOX + 8} px"):
        assert any(expected in e for e in errors), (expected, errors)
    # ab-initio: particles without CTF (no alignment is needed)
    from cryocv.protocols import ProtCryocvAbinitio
    abinitio = project.newProtocol(ProtCryocvAbinitio)
    abinitio.inputParticles.set(bare.outputParticles)
    errors = abinitio.validate()
    assert any("no CTF" in e for e in errors) and not any("alignment" in e for e in errors), errors
    abinitio = project.newProtocol(ProtCryocvAbinitio)
    abinitio.inputParticles.set(particles)
    assert abinitio.validate() == []
    refine = project.newProtocol(ProtCryocvRefine, gpuList="")
    refine.inputParticles.set(particles)
    refine.referenceVolume.set(reference)
    assert any("GPU IDs are empty" in e for e in refine.validate())
    refine = project.newProtocol(ProtCryocvRefine)
    refine.inputParticles.set(particles)
    refine.referenceVolume.set(reference)
    assert refine.validate() == []
    # symmetry relaxation: Break symmetry first without relaxing, or without input poses; relaxing C1;
    # the core's parameter errors in the form's words
    from cryocv.protocols.protocol_relaxation import relaxChoice
    refine = project.newProtocol(ProtCryocvRefine, symmetryGroup="C4", breakSymmetry=True)
    refine.inputParticles.set(particles)
    refine.referenceVolume.set(reference)
    errors = refine.validate()
    assert len(errors) == 1 and "Break symmetry first" in errors[0] and "Relax symmetry is off" in errors[0], errors
    refine.relax.set(relaxChoice("maximize"))
    assert refine.validate() == []                               # the imported particles have poses
    refine.inputParticles.set(bare.outputParticles)
    assert any("Break symmetry first needs input particles with an alignment" in e for e in refine.validate())
    refine.breakSymmetry.set(False)
    assert not any("Break symmetry" in e for e in refine.validate())   # relaxing alone needs no poses
    refine = project.newProtocol(ProtCryocvRefine, relax=relaxChoice("marginalize"))   # the default symmetry, C1
    refine.inputParticles.set(particles)
    refine.referenceVolume.set(reference)
    errors = refine.validate()
    assert len(errors) == 1 and "Relax symmetry relaxes the Symmetry" in errors[0] and "not C1" in errors[0], errors
    refine.symmetryGroup.set("D3")
    refine.relaxMaxAlignRes.set(-4.0)
    errors = refine.validate()
    assert len(errors) == 1 and "Max. resolution for the mate choice must be positive" in errors[0], errors


def test_refine_protocol_recovers_poses_and_map(refined, imported, dataset, tmp_path):
    root, truth = dataset
    particles, _ = imported
    out = refined.outputParticles
    assert out.getSize() == N_PARTICLES and out.hasAlignmentProj() and out.hasCTF()
    truth_poses = load_particles(str(root / "sim" / "particles.star"))
    before = scipion_poses(particles, str(tmp_path))
    after = scipion_poses(out, str(tmp_path))
    # the imported alignment was random; the refined one is the truth's
    assert np.median(angular_distance_deg(before.rotations, truth_poses.rotations)) > 60
    error = angular_distance_deg(after.rotations, truth_poses.rotations)
    assert np.median(error) < 6.0, np.percentile(error, [50, 90])
    assert np.median(np.linalg.norm(after.origin_A - truth_poses.origin_A, axis=1)) < 1.0
    halves = np.array([p._rlnRandomSubset.get() for p in out.iterItems(orderBy="id")])
    np.testing.assert_array_equal(halves, truth_poses.half_set)          # half-sets kept from the STAR
    volume = refined.outputVolume
    half1, half2 = volume.getHalfMaps().split(",")
    assert all(os.path.exists(p) for p in (volume.getFileName(), half1, half2))
    assert volume.getSamplingRate() == pytest.approx(PIXEL_A) and volume.getDim() == (BOX, BOX, BOX)
    assert vs_truth_A(volume.getFileName(), truth) < 9.0                 # from a 20 Å start
    resolution = float(refined.outputFSC.calculateResolution())
    report = refined._fscReport()
    assert resolution == pytest.approx(report["resolution_A"], rel=0.05) and 4.0 <= resolution < 10.0
    assert f"{report['resolution_A']:.2f} Å" in refined.summary()[0] and "CPU" in refined.summary()[1]
    assert "[Punjani2020]" in refined.methods()[0]
    project = refined.getProject()
    sources = {o.getObjId() for o in project.getSourceChilds(particles)}
    assert volume.getObjId() in sources
    assert refined.outputFSC.getObjId() in {o.getObjId() for o in project.getSourceChilds(volume)}
    from pyworkflow.object import RELATION_TRANSFORM
    transformed = project.mapper.getRelationChilds(RELATION_TRANSFORM, particles)
    assert out.getObjId() in {o.getObjId() for o in transformed}


def test_reconstruct_protocol_from_refined_poses(project, refined, dataset):
    from cryocv.protocols import ProtCryocvReconstruct
    root, truth = dataset
    protocol = project.newProtocol(ProtCryocvReconstruct, objLabel="cryocv reconstruct", useGpu=False)
    protocol.inputParticles.set(refined.outputParticles)
    launch(project, protocol)
    volume = protocol.outputVolume
    assert all(os.path.exists(p) for p in [volume.getFileName()] + volume.getHalfMaps().split(","))
    assert vs_truth_A(volume.getFileName(), truth) < 9.0
    report = protocol._fscReport()
    assert report["n_particles"] == N_PARTICLES
    # the refinement's half-sets travel through Scipion (_rlnRandomSubset) into the reconstruction
    used = load_particles(protocol._jobPath("particles.star"))
    np.testing.assert_array_equal(used.half_set, load_particles(str(root / "sim" / "particles.star")).half_set)
    assert float(protocol.outputFSC.calculateResolution()) == pytest.approx(report["resolution_A"], rel=0.05)
    assert f"{report['resolution_A']:.2f} Å" in protocol.summary()[0]
    assert "[Chen2013]" in protocol.methods()[0] and protocol._citations() == ["Scheres2012", "Chen2013"]
    assert protocol.warnings() == []   # the particles have a CTF


def test_subtract_protocol_leaves_the_noise_with_half_sets_poses_and_original_names(project, dataset, tmp_path):
    """Particles with their true poses and half-sets, the true map as both half-maps and an all-zero
    keep mask: the subtracted (and cropped) images are the simulation's noise; the output set keeps
    poses and half-sets and records each particle's original image."""
    from pwem.protocols import ProtImportMask, ProtImportParticles, ProtImportVolumes
    from cryocv.protocols import ProtCryocvSubtract
    root, truth = dataset
    for name in ("truth_half1", "truth_half2"):      # the importer links the half-maps by name
        write_map(str(root / f"{name}.mrc"), truth, PIXEL_A)
    write_map(str(root / "zero_mask.mrc"), np.zeros_like(truth), PIXEL_A)
    particles = launch(project, project.newProtocol(
        ProtImportParticles, objLabel="import true poses", importFrom=ProtImportParticles.IMPORT_FROM_RELION,
        starFile=str(root / "sim" / "particles.star"), samplingRate=PIXEL_A, voltage=300, sphericalAberration=2.7,
        amplitudeContrast=0.1)).outputParticles
    volume = launch(project, project.newProtocol(
        ProtImportVolumes, filesPath=str(root / "truth.mrc"), samplingRate=PIXEL_A, setHalfMaps=True,
        half1map=str(root / "truth_half1.mrc"), half2map=str(root / "truth_half2.mrc"))).outputVolume
    mask = launch(project, project.newProtocol(ProtImportMask, maskPath=str(root / "zero_mask.mrc"),
                                               samplingRate=PIXEL_A)).outputMask
    protocol = project.newProtocol(ProtCryocvSubtract, objLabel="cryocv subtract", newBox=BOX - 8, useGpu=False)
    protocol.inputParticles.set(particles)
    protocol.inputVolume.set(volume)
    protocol.refMask.set(mask)
    assert protocol.validate() == []
    launch(project, protocol)
    out = protocol.outputParticles
    assert out.getSize() == N_PARTICLES and out.hasAlignmentProj() and out.getXDim() == BOX - 8
    clean = simulate(truth, PIXEL_A, N_PARTICLES, str(tmp_path / "clean"), snr=np.inf, seed=3, progress=False,
                     shift_sigma_A=2.0).read_images()
    noisy = load_particles(str(root / "sim" / "particles.star"))
    noise = (noisy.read_images() - clean)[:, 4:BOX - 4, 4:BOX - 4]
    subtracted = scipion_poses(out, str(tmp_path))
    residual = subtracted.read_images() - noise
    fraction = float((residual ** 2).sum() / (clean[:, 4:BOX - 4, 4:BOX - 4] ** 2).sum())
    print(f"Scipion subtraction, zero keep mask: residual signal power {fraction:.2e}")
    assert fraction < 0.02
    np.testing.assert_array_equal(subtracted.half_set, noisy.half_set)
    np.testing.assert_allclose(subtracted.euler_deg, noisy.euler_deg, atol=0.01)
    originals = [p._rlnImageOriginalName.get() for p in out.iterItems(orderBy="id")]
    inputs = [p.getLocation() for p in particles.iterItems(orderBy="id")]
    assert [(int(o.split("@")[0]), os.path.realpath(o.split("@")[1])) for o in originals] == \
        [(i, os.path.realpath(f)) for i, f in inputs]         # the stacks the conversion linked into extra/
    assert "Subtracted 300 particles" in protocol.summary()[0]
    volume_without_halves = launch(project, project.newProtocol(
        ProtImportVolumes, filesPath=str(root / "truth.mrc"), samplingRate=PIXEL_A)).outputVolume
    protocol = project.newProtocol(ProtCryocvSubtract, newBox=23)
    protocol.inputParticles.set(particles)
    protocol.inputVolume.set(volume_without_halves)
    protocol.refMask.set(mask)
    errors = protocol.validate()
    assert any("no half-maps" in e for e in errors) and any("even" in e for e in errors), errors


def test_refine_form_mirrors_the_cli():
    """The form's defaults are the job's (RefineParams), the relaxation options included, and
    every form value reaches the CLI: its arguments parse back into the same parameters. The
    relaxation options are shown only while relaxing (Break symmetry first also while set) and
    passed only when set; hidden ones are not used. Relax symmetry offers the core's modes
    (off, maximize, marginalize), each reaching --relax."""
    import dataclasses
    from cryocv.cli import build_parser
    from cryocv.jobs.common import params_from_args
    from cryocv.jobs.refine import RELAX_MODES, RefineParams
    from cryocv.protocols import ProtCryocvRefine
    from cryocv.protocols.protocol_relaxation import relaxChoice

    def parsed(protocol):
        return params_from_args(RefineParams, build_parser().parse_args(["refine"] + protocol._refineArgs()))
    protocol = ProtCryocvRefine()
    assert protocol._refineParams() == RefineParams() == parsed(protocol)
    assert list(protocol.getParam("relax").choices) == ["off", "maximize", "marginalize"]
    assert [RELAX_MODES[i] for i in range(3)] == [None, "maximize", "marginalize"]   # the form's order is the core's
    assert (protocol.relax.get(), protocol.breakSymmetry.get(), protocol.relaxMaxAlignRes.get(),
            protocol.extraFinalPasses.get()) == (relaxChoice(RefineParams.relax), RefineParams.break_symmetry,
                                                 RefineParams.relax_max_align_res_A, RefineParams.extra_final_passes)
    assert protocol._relaxMode() is None and RefineParams.relax is None      # off by default
    args = protocol._refineArgs()
    assert not {"--relax", "--break-symmetry", "--relax-max-align-res-A", "--extra-final-passes"} & set(args)
    assert not any(protocol.evalParamCondition(name) for name in ("breakSymmetry", "relaxMaxAlignRes",
                                                                  "extraFinalPasses"))
    values = dict(relax=relaxChoice("maximize"), breakSymmetry=True, relaxMaxAlignRes=6.5, extraFinalPasses=2,
                  symmetryGroup="C4", regularizer=1, initialLowpass=15.0, maxIterations=3, maxShift=4.0, seed=7)
    for name, value in values.items():
        getattr(protocol, name).set(value)
    assert all(protocol.evalParamCondition(name) for name in ("breakSymmetry", "relaxMaxAlignRes",
                                                              "extraFinalPasses"))
    changed = protocol._refineParams()
    assert parsed(protocol) == changed
    expected = dict(relax="maximize", break_symmetry=True, relax_max_align_res_A=6.5, extra_final_passes=2,
                    symmetry="C4", regularizer="uniform", initial_lowpass_A=15.0, max_iterations=3, max_shift_A=4.0,
                    seed=7)
    default = RefineParams()
    assert {f.name: getattr(changed, f.name) for f in dataclasses.fields(changed)
            if getattr(changed, f.name) != getattr(default, f.name)} == expected   # every form value, nothing else
    args = protocol._refineArgs()
    assert args[args.index("--relax") + 1] == "maximize"
    assert args[args.index("--relax-max-align-res-A") + 1] == "6.5" and "--break-symmetry" in args
    assert args[args.index("--extra-final-passes") + 1] == "2"
    # marginalization: --relax marginalize, the other options as they were
    protocol.relax.set(relaxChoice("marginalize"))
    assert all(protocol.evalParamCondition(name) for name in ("breakSymmetry", "relaxMaxAlignRes",
                                                              "extraFinalPasses"))
    args = protocol._refineArgs()
    assert args[args.index("--relax") + 1] == "marginalize" and args.count("--relax") == 1
    changed = protocol._refineParams()
    assert parsed(protocol) == changed and changed.relax == "marginalize" and changed.break_symmetry
    assert (changed.relax_max_align_res_A, changed.extra_final_passes) == (6.5, 2)
    # relaxing off: the hidden mate-choice resolution and extra passes are not used; Break symmetry
    # first stays visible while set (the form reports it, see test_validate_catches_bad_inputs)
    protocol.relax.set(relaxChoice(None))
    assert protocol.evalParamCondition("breakSymmetry") and not protocol.evalParamCondition("relaxMaxAlignRes")
    protocol.breakSymmetry.set(False)
    assert not protocol.evalParamCondition("breakSymmetry")
    changed = protocol._refineParams()
    assert parsed(protocol) == changed and changed.relax is None and not changed.break_symmetry
    assert (changed.relax_max_align_res_A, changed.extra_final_passes) == (RefineParams.relax_max_align_res_A,
                                                                          RefineParams.extra_final_passes)
    assert not {"--relax", "--break-symmetry", "--relax-max-align-res-A", "--extra-final-passes"} & set(
        protocol._refineArgs())
    # likelihood-weighted poses: passed only when set; its error names the form's label
    assert "--marginalize-step-deg" not in protocol._refineArgs()
    protocol.marginalizeStep.set(1.5)
    changed = protocol._refineParams()
    assert parsed(protocol) == changed and changed.marginalize_step_deg == 1.5
    from cryocv.protocols.protocol_refine import FORM_LABELS
    protocol.marginalizeStep.set(0.0)
    assert any("Marginalize over poses: step" in e for e in protocol._paramsErrors(protocol._refineParams(),
                                                                                  FORM_LABELS))
    # staged start: passed only when set; its error names the form's label
    protocol.marginalizeStep.set(None)
    assert "--staged-start-res-A" not in protocol._refineArgs()
    protocol.stagedStart.set(8.0)
    changed = protocol._refineParams()
    assert parsed(protocol) == changed and changed.staged_start_res_A == 8.0
    protocol.stagedStart.set(-1.0)
    assert any("Staged start" in e for e in protocol._paramsErrors(protocol._refineParams(), FORM_LABELS))
    # half-set registration: on by default (no argument), off reaches --no-register-halves
    protocol.stagedStart.set(None)
    assert protocol.registerHalves.get() is True and "--no-register-halves" not in protocol._refineArgs()
    protocol.registerHalves.set(False)
    changed = protocol._refineParams()
    assert parsed(protocol) == changed and not changed.register_halves and "--no-register-halves" in protocol._refineArgs()


def test_local_refine_form_mirrors_the_cli():
    """The form's defaults are the job's (LocalRefineParams), and every form value reaches the
    CLI: its arguments parse back into the same parameters. The symmetry relaxation section is
    the refinement's: off by default (no relaxation arguments), each mode and option reaching
    its flag, hidden options unused."""
    import dataclasses
    from cryocv.cli import build_parser
    from cryocv.jobs.common import params_from_args
    from cryocv.jobs.local_refine import LocalRefineParams
    from cryocv.protocols import ProtCryocvLocalRefine, ProtCryocvRefine
    from cryocv.protocols.protocol_relaxation import relaxChoice

    def parsed(protocol):
        return params_from_args(LocalRefineParams, build_parser().parse_args(["local-refine"]
                                                                             + protocol._localRefineArgs()))
    protocol = ProtCryocvLocalRefine()
    assert protocol._localParams() == LocalRefineParams() == parsed(protocol)
    for name, value in dict(fulcrum=2, fulcrumX=10.0, fulcrumY=20.5, fulcrumZ=3.0, priorSigmaRot=15.0,
                            priorSigmaShift=7.0, coarseStep=3.0, fineStep=1.0, rotationExtent=8.0, shiftExtent=3.0,
                            recenter=True, subtractOutside=True, fitScale=False, maskMode=1, regularizer=1,
                            symmetryGroup="C2", initialLowpass=9.0, maxIterations=3, narrowSteps=2,
                            marginalizeStep=1.5).items():
        getattr(protocol, name).set(value)
    changed = protocol._localParams()
    assert parsed(protocol) == changed and changed.fulcrum == "10,20.5,3" and changed.subtract and not changed.fit_scale
    assert changed.narrow_steps == 2 and changed.marginalize_step_deg == 1.5
    protocol.marginalizeStep.set(None)          # it excludes symmetry relaxation, set below
    changed = protocol._localParams()
    from cryocv.protocols.protocol_local_refine import FORM_LABELS
    bad = ProtCryocvLocalRefine()
    bad.marginalizeStep.set(0.0)
    assert any("Marginalize over poses: step" in e for e in bad._paramsErrors(bad._localParams(), FORM_LABELS))
    assert {f: getattr(changed, f) for f in ("prior_sigma_deg", "prior_sigma_A", "mask_mode", "regularizer")} == \
        {"prior_sigma_deg": 15.0, "prior_sigma_A": 7.0, "mask_mode": "dynamic", "regularizer": "uniform"}
    # symmetry relaxation: the refinement's section (same parameters, choices and defaults)
    relaxation = ("relax", "breakSymmetry", "relaxMaxAlignRes", "extraFinalPasses")
    refine = ProtCryocvRefine()
    for name in relaxation:
        assert type(protocol.getParam(name)) is type(refine.getParam(name))
        assert protocol.getParam(name).default.get() == refine.getParam(name).default.get(), name
    assert list(protocol.getParam("relax").choices) == ["off", "maximize", "marginalize"]
    assert protocol.relax.get() == relaxChoice(LocalRefineParams.relax) and changed.relax is None
    assert not {"--relax", "--break-symmetry", "--relax-max-align-res-A", "--extra-final-passes"} & set(
        protocol._localRefineArgs())
    assert not any(protocol.evalParamCondition(name) for name in relaxation[1:])
    before = changed
    for name, value in dict(relax=relaxChoice("marginalize"), breakSymmetry=True, relaxMaxAlignRes=7.5,
                            extraFinalPasses=1, symmetryGroup="C4").items():
        getattr(protocol, name).set(value)
    assert all(protocol.evalParamCondition(name) for name in relaxation[1:])
    args = protocol._localRefineArgs()
    assert args[args.index("--relax") + 1] == "marginalize" and "--break-symmetry" in args
    assert args[args.index("--relax-max-align-res-A") + 1] == "7.5"
    assert args[args.index("--extra-final-passes") + 1] == "1" and args[args.index("--sym") + 1] == "C4"
    changed = protocol._localParams()
    assert parsed(protocol) == changed
    assert {f.name: getattr(changed, f.name) for f in dataclasses.fields(changed)
            if getattr(changed, f.name) != getattr(before, f.name)} == dict(
        relax="marginalize", break_symmetry=True, relax_max_align_res_A=7.5, extra_final_passes=1, symmetry="C4")
    protocol.relax.set(relaxChoice("maximize"))
    args = protocol._localRefineArgs()
    assert args[args.index("--relax") + 1] == "maximize" and parsed(protocol).relax == "maximize"
    # off again: Break symmetry first stays (visible, reported by _validate), the hidden options are unused
    protocol.relax.set(relaxChoice(None))
    args = protocol._localRefineArgs()
    assert "--relax" not in args and "--break-symmetry" in args
    assert not {"--relax-max-align-res-A", "--extra-final-passes"} & set(args)
    assert (protocol._localParams().relax_max_align_res_A, protocol._localParams().extra_final_passes) == (
        LocalRefineParams.relax_max_align_res_A, LocalRefineParams.extra_final_passes)
    assert any("Break symmetry first is set but Relax symmetry is off" in e for e in protocol._relaxationErrors())


def test_abinitio_form_mirrors_the_cli():
    """The form's defaults are the job's (AbinitioParams), every form value reaches the CLI (its
    arguments parse back into the same parameters), and the core's parameter errors come back
    in the form's words."""
    import dataclasses
    from cryocv.cli import build_parser
    from cryocv.jobs.abinitio import AbinitioParams
    from cryocv.jobs.common import params_from_args
    from cryocv.protocols import ProtCryocvAbinitio

    def parsed(protocol):
        args = build_parser().parse_args(["abinitio"] + protocol._abinitioArgs())
        args.minibatch_start, args.minibatch_end = args.minibatch          # as abinitio.main does
        return params_from_args(AbinitioParams, args)
    protocol = ProtCryocvAbinitio()
    assert protocol._abinitioParams() == AbinitioParams() == parsed(protocol)
    assert "--n-particles" not in protocol._abinitioArgs()                 # empty: all particles
    values = dict(symmetryGroup="C2", nParticles=100, initRes=25.0, sgdIterations=50, minibatchStart=20,
                  minibatchEnd=40, checkEvery=5, regularizer=1, maxIterations=2, seed=7)
    for name, value in values.items():
        getattr(protocol, name).set(value)
    changed = protocol._abinitioParams()
    assert parsed(protocol) == changed
    expected = dict(symmetry="C2", n_particles=100, init_res_A=25.0, sgd_iterations=50, minibatch_start=20,
                    minibatch_end=40, check_every=5, regularizer="uniform", max_iterations=2, seed=7)
    default = AbinitioParams()
    assert {f.name: getattr(changed, f.name) for f in dataclasses.fields(changed)
            if getattr(changed, f.name) != getattr(default, f.name)} == expected   # every form value, nothing else
    for name, value, words in (("minibatchStart", 400, "Minibatch start"), ("nParticles", 3, "Number of particles"),
                               ("initRes", -1.0, "Initial resolution")):
        bad = ProtCryocvAbinitio()
        getattr(bad, name).set(value)
        assert any(words in e for e in bad._validate()), (name, bad._validate())


def test_abinitio_step_continues_a_killed_job_in_its_sgd_phase(tmp_path, monkeypatch):
    """A job killed during its SGD phase (sgd_state.npz, no checkpoint.json yet) continues with
    --continue when the step runs again with the same arguments, and starts over with others."""
    from cryocv.jobs import jobdir
    from cryocv.protocols import ProtCryocvAbinitio
    protocol = ProtCryocvAbinitio()
    monkeypatch.setattr(protocol, "_getExtraPath", lambda *names: os.path.join(str(tmp_path), "extra", *names))
    calls = []
    monkeypatch.setattr(protocol, "_runCryocv", lambda command, args: calls.append((command, args)))
    args = protocol._abinitioArgs()
    os.makedirs(protocol._jobPath())
    protocol.abinitioStep(args)                                   # a fresh job: the arguments as they are
    assert calls[-1] == ("abinitio", args)
    open(protocol._jobPath(jobdir.SGD_STATE), "wb").close()       # ...killed during the SGD
    protocol.abinitioStep(args)
    assert calls[-1] == ("abinitio", ["--continue", protocol._jobPath()])
    other = list(args)
    other[other.index("--seed") + 1] = "99"
    protocol.abinitioStep(other)                                  # an edited form starts over
    assert calls[-1] == ("abinitio", other) and not os.path.exists(protocol._jobPath(jobdir.SGD_STATE))


def test_abinitio_protocol_from_particles_without_poses(project, tmp_path_factory):
    """A tiny set (24 px, 300 particles) imported without poses or half-sets, 240 of them used:
    a short ab-initio job on the CPU registers particles with a projection alignment and
    half-sets, a map with half-maps on the particles' grid and the FSC; summary, methods and
    viewer (FSC, poses, resolution against iteration) follow."""
    from pwem.protocols import ProtImportParticles
    from pyworkflow.object import RELATION_TRANSFORM
    from cryocv.protocols import ProtCryocvAbinitio
    from cryocv.viewers import CryocvViewer
    root = tmp_path_factory.mktemp("scipion_abinitio")
    box, pixel_A, n, used = 24, 3.0, 300, 240
    truth = asymmetric_map(box, seed=11, n_atoms=50, sigma_px=1.0)
    simulate(truth, pixel_A, n, str(root), snr=1.0, seed=2, progress=False)
    tables = starfile.read(str(root / "particles.star"), always_dict=True)
    tables["particles"] = tables["particles"].drop(columns=[c for c in tables["particles"].columns if c.startswith(
        ("rlnAngle", "rlnOrigin", "rlnRandomSubset"))])
    starfile.write(tables, str(root / "no_poses.star"), overwrite=True)
    particles = launch(project, project.newProtocol(
        ProtImportParticles, objLabel="import without poses", importFrom=ProtImportParticles.IMPORT_FROM_RELION,
        starFile=str(root / "no_poses.star"), samplingRate=pixel_A, voltage=300, sphericalAberration=2.7,
        amplitudeContrast=0.1)).outputParticles
    assert particles.getSize() == n and not particles.hasAlignmentProj() and particles.hasCTF()
    protocol = project.newProtocol(ProtCryocvAbinitio, objLabel="cryocv ab-initio", nParticles=used,
                                   sgdIterations=12, minibatchStart=30, minibatchEnd=60, checkEvery=6,
                                   maxIterations=1, regularizer=1, useGpu=False)
    protocol.inputParticles.set(particles)
    assert protocol.validate() == []
    launch(project, protocol)

    out = protocol.outputParticles
    assert out.getSize() == used and out.hasAlignmentProj() and out.hasCTF()
    assert out.getSamplingRate() == pytest.approx(pixel_A) and out.getXDim() == box
    assert all(p.getTransform() is not None for p in out.iterItems())
    poses = scipion_poses(out, str(root))
    assert len(poses) == used and poses.has_alignment
    assert np.std(poses.euler_deg[:, 1]) > 10                   # poses from the search, not all one
    halves = np.array([p._rlnRandomSubset.get() for p in out.iterItems(orderBy="id")])
    assert set(halves) == {1, 2} and abs(int((halves == 1).sum()) - used // 2) <= 2   # the job's seeded split
    volume = protocol.outputVolume
    halves_maps = volume.getHalfMaps().split(",")
    assert len(halves_maps) == 2 and all(os.path.exists(p) for p in [volume.getFileName()] + halves_maps)
    assert volume.getSamplingRate() == pytest.approx(pixel_A) and volume.getDim() == (box, box, box)
    for path in halves_maps:
        half, half_pixel_A = read_map(path)
        assert half.shape == (box,) * 3 and half_pixel_A == pytest.approx(pixel_A)
    report = protocol._fscReport()
    assert report["n_particles"] == used and report["sgd"][-1]["iteration"] == 12 and len(report["sgd"]) == 2
    assert float(protocol.outputFSC.calculateResolution()) == pytest.approx(report["resolution_A"], rel=0.05)
    assert 2 * pixel_A <= report["resolution_A"] < 30.0
    summary = protocol.summary()
    print("\n".join(summary + protocol.methods()))
    assert f"{report['resolution_A']:.2f} Å" in summary[0] and "after 2 E/M passes" in summary[0]
    assert "SGD: 12 iterations" in summary[1]
    assert "CPU" in summary[2]
    assert "[Punjani2017]" in protocol.methods()[0] and protocol._citations() == ["Punjani2017", "Scheres2012"]
    assert volume.getObjId() in {o.getObjId() for o in project.getSourceChilds(particles)}
    assert out.getObjId() in {o.getObjId() for o in project.mapper.getRelationChilds(RELATION_TRANSFORM, particles)}
    assert protocol.outputFSC.getObjId() in {o.getObjId() for o in project.getSourceChilds(volume)}
    # the viewer: FSC, viewing directions, and resolution against iteration (SGD, then E/M)
    views = CryocvViewer(project=project, protocol=protocol)._visualize(protocol)
    assert len(views) == 3
    axes = views[2].figure.axes[0]
    assert axes.get_ylabel() == "resolution (Å)" and "SGD iteration" in axes.get_xlabel()
    assert any(list(line.get_xdata()) == [6, 12] for line in axes.lines)  # the SGD checks
    for name, view in zip(["fsc", "poses", "abinitio"], views):
        path = str(root / f"{name}_view.png")
        view.figure.savefig(path)
        assert matplotlib_image(path)[..., :3].std() > 0.05


def _correlation(a, b):
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def test_local_refine_protocol_subtracts_and_brings_perturbed_poses_back(project, tmp_path_factory):
    """A rigid particle simulated at known poses, imported with poses perturbed by 2-6° and
    ±1.5 Å, the true map as both consensus half-maps and a soft mask on one half of it: with
    subtraction, the output images lack the signal outside the mask but keep the inside, the
    poses move towards the truth and stay inside the extents, and the outputs (map with
    half-maps, mask, FSC, summary, viewer) say so."""
    from pwem.protocols import ProtImportMask, ProtImportParticles, ProtImportVolumes
    from pyworkflow.object import RELATION_TRANSFORM
    from cryocv.geometry import axis_angle_to_matrix
    from cryocv.io.particle_files import save_particles
    from cryocv.local_search import to_fulcrum_frame
    from cryocv.masks import threshold_mask
    from cryocv.protocols import ProtCryocvLocalRefine
    from cryocv.viewers import CryocvViewer
    root = tmp_path_factory.mktemp("scipion_local")
    n, extent_deg, extent_A = 150, 10.0, 4.0
    truth = asymmetric_map(BOX, seed=8)
    simulate(truth, PIXEL_A, n, str(root), snr=2.0, seed=4, progress=False, shift_sigma_A=2.0)
    right = truth.copy()
    right[:, :, :BOX // 2] = 0                                    # the atoms at x >= 0
    mask = threshold_mask(right, 0.1 * float(truth.max()), dilation_px=2.0, edge_px=4.0).astype(np.float32)
    write_map(str(root / "mask.mrc"), mask, PIXEL_A)
    for name in ("consensus", "consensus_half1", "consensus_half2"):
        write_map(str(root / f"{name}.mrc"), truth, PIXEL_A)
    true_poses = load_particles(str(root / "particles.star"))
    rng = np.random.default_rng(9)
    axes = rng.normal(size=(n, 3))
    angles = np.radians(rng.uniform(2, 6, n))
    perturbed = true_poses.subset(np.arange(n))
    perturbed.euler_deg = matrix_to_euler(true_poses.rotations @ axis_angle_to_matrix(
        axes / np.linalg.norm(axes, axis=1, keepdims=True) * angles[:, None]))
    perturbed.origin_A = true_poses.origin_A + rng.uniform(-1.5, 1.5, (n, 2))
    save_particles(perturbed, str(root / "perturbed.star"))

    particles = launch(project, project.newProtocol(
        ProtImportParticles, objLabel="import perturbed poses", importFrom=ProtImportParticles.IMPORT_FROM_RELION,
        starFile=str(root / "perturbed.star"), samplingRate=PIXEL_A, voltage=300, sphericalAberration=2.7,
        amplitudeContrast=0.1)).outputParticles
    volume = launch(project, project.newProtocol(
        ProtImportVolumes, filesPath=str(root / "consensus.mrc"), samplingRate=PIXEL_A, setHalfMaps=True,
        half1map=str(root / "consensus_half1.mrc"), half2map=str(root / "consensus_half2.mrc"))).outputVolume
    region = launch(project, project.newProtocol(ProtImportMask, maskPath=str(root / "mask.mrc"),
                                                 samplingRate=PIXEL_A)).outputMask
    protocol = project.newProtocol(ProtCryocvLocalRefine, objLabel="cryocv local refine", subtractOutside=True,
                                   rotationExtent=extent_deg, shiftExtent=extent_A, maxIterations=2,
                                   initialLowpass=8.0, useGpu=False)
    protocol.inputParticles.set(particles)
    protocol.inputVolume.set(volume)
    protocol.refMask.set(region)
    assert protocol.validate() == []
    assert "--subtract" in protocol._localRefineArgs() and "--recenter-each-iteration" not in protocol._localRefineArgs()
    launch(project, protocol)

    out = protocol.outputParticles
    assert out.getSize() == n and out.hasAlignmentProj() and out.hasCTF()
    before, after = scipion_poses(particles, str(root)), scipion_poses(out, str(root))
    np.testing.assert_array_equal(after.half_set, true_poses.half_set)
    # poses: closer to the truth than the perturbed input, and within the extents of it
    error_before = np.median(angular_distance_deg(before.rotations, true_poses.rotations))
    error_after = np.median(angular_distance_deg(after.rotations, true_poses.rotations))
    shift_before = np.median(np.linalg.norm(before.origin_A - true_poses.origin_A, axis=1))
    shift_after = np.median(np.linalg.norm(after.origin_A - true_poses.origin_A, axis=1))
    print(f"Scipion local refinement: median pose error {error_before:.2f}° -> {error_after:.2f}°, "
          f"shift {shift_before:.2f} -> {shift_after:.2f} Å")
    assert error_after < 0.7 * error_before and shift_after < 0.7 * shift_before
    change = angular_distance_deg(after.rotations, before.rotations)
    assert change.max() <= extent_deg + 1e-2 and np.median(change) > 1.0
    report = protocol._fscReport()
    fulcrum = np.array(report["local"]["fulcrum_A"]) / PIXEL_A - BOX // 2
    assert fulcrum[0] > 2                                          # the mask's centre of mass, in the x >= 0 half
    moved = np.linalg.norm(to_fulcrum_frame(after.rotations, after.origin_A / PIXEL_A, fulcrum)
                           - to_fulcrum_frame(before.rotations, before.origin_A / PIXEL_A, fulcrum), axis=1) * PIXEL_A
    assert moved.max() <= extent_A + 1e-2
    # images: the signal outside the mask is gone, the inside is kept; originals recorded
    outside = simulate(truth * (1 - mask), PIXEL_A, n, str(root / "clean"), snr=np.inf, seed=4, progress=False,
                       shift_sigma_A=2.0, name="outside").read_images()
    inside = simulate(truth * mask, PIXEL_A, n, str(root / "clean"), snr=np.inf, seed=4, progress=False,
                      shift_sigma_A=2.0, name="inside").read_images()
    images, subtracted = before.read_images(), after.read_images()
    print(f"outside signal correlation {_correlation(images, outside):.3f} -> {_correlation(subtracted, outside):.3f}, "
          f"inside {_correlation(images, inside):.3f} -> {_correlation(subtracted, inside):.3f}")
    assert _correlation(subtracted, outside) < 0.3 * _correlation(images, outside)
    assert _correlation(subtracted, inside) > 0.9 * _correlation(images, inside)
    originals = [p._rlnImageOriginalName.get() for p in out.iterItems(orderBy="id")]
    inputs = [p.getLocation() for p in particles.iterItems(orderBy="id")]
    assert [(int(o.split("@")[0]), os.path.realpath(o.split("@")[1])) for o in originals] == \
        [(i, os.path.realpath(f)) for i, f in inputs]
    # map with half-maps, the mask the FSC used, the FSC; the map agrees with the truth in the mask
    refined = protocol.outputVolume
    halves = refined.getHalfMaps().split(",")
    assert len(halves) == 2 and all(os.path.exists(p) for p in [refined.getFileName()] + halves)
    assert refined.getDim() == (BOX, BOX, BOX) and refined.getSamplingRate() == pytest.approx(PIXEL_A)
    used_mask, _ = read_map(protocol.outputMask.getFileName())
    np.testing.assert_allclose(used_mask, mask, atol=1e-5)        # static mask: the input's
    refined_map, _ = read_map(refined.getFileName())
    assert resolution_at(fsc_curve(refined_map * mask, truth * mask), 0.5, BOX, PIXEL_A) < 9.0
    resolution = report["resolution_A"]
    assert float(protocol.outputFSC.calculateResolution()) == pytest.approx(resolution, rel=0.05)
    assert 4.0 <= resolution < 9.0
    local = report["local"]
    summary = protocol.summary()
    print("\n".join(summary + protocol.methods()))
    assert f"{resolution:.2f} Å" in summary[0] and "in the mask" in summary[0]
    assert f"{local['mask_mass_kDa']:.0f} kDa" in summary[1] and 10 < local["mask_mass_kDa"] < 100
    assert f"median {local['rotation_change_median_deg']:.2f}°" in summary[2]
    assert local["rotation_change_median_deg"] == pytest.approx(np.median(change), abs=0.05)
    assert "subtracted" in summary[3] and "CPU" in summary[4]
    # the default regularizer of local refinement is uniform (FSC-Wiener): Scheres 2012, not the NU paper
    assert "[Punjani2017]" in protocol.methods()[0] and "Scheres2012" in protocol._citations()
    assert "Punjani2020" not in protocol._citations()
    assert refined.getObjId() in {o.getObjId() for o in project.getSourceChilds(particles)}
    assert out.getObjId() in {o.getObjId() for o in project.mapper.getRelationChilds(RELATION_TRANSFORM, particles)}
    # the viewer: FSC curves and the pose-change histograms drawn from the job's particles
    views = CryocvViewer(project=project, protocol=protocol)._visualize(protocol)
    assert len(views) == 2
    rotation_axes, shift_axes = views[1].figure.axes
    assert "rotation change" in rotation_axes.get_xlabel() and "shift change" in shift_axes.get_xlabel()
    assert sum(p.get_height() for p in rotation_axes.patches) == n
    path = str(root / "pose_change_view.png")
    views[1].figure.savefig(path)
    assert matplotlib_image(path)[..., :3].std() > 0.05
    # bad parameters are reported in the form's words
    bad = project.newProtocol(ProtCryocvLocalRefine, rotationExtent=200.0, fulcrum=2)
    bad.inputParticles.set(particles)
    bad.inputVolume.set(volume)
    bad.refMask.set(region)
    assert any("Rotation extent" in e and "180" in e for e in bad.validate())


def matplotlib_image(path):
    import matplotlib.image
    return matplotlib.image.imread(path)


def test_viewers_render_fsc_and_pose_plots(refined, tmp_path):
    from pyworkflow.viewer import DESKTOP_TKINTER
    from cryocv.viewers import CryocvViewer
    import matplotlib.image
    viewer = CryocvViewer(project=refined.getProject(), protocol=refined)
    views = viewer._visualize(refined)
    assert len(views) == 2 and DESKTOP_TKINTER in CryocvViewer._environments
    for name, view in zip(["fsc", "poses"], views):
        path = str(tmp_path / f"{name}.png")
        view.figure.savefig(path)
        image = matplotlib.image.imread(path)
        assert image.shape[0] > 300 and image[..., :3].std() > 0.05   # a drawn figure, not a blank canvas
    fsc_axes = views[0].figure.axes[0]
    assert any(abs(line.get_ydata()[0] - 0.143) < 1e-9 for line in fsc_axes.lines if len(line.get_ydata()) == 2)
    assert {t.get_text() for t in fsc_axes.get_legend().get_texts()} >= {"unmasked", "masked", "corrected"}
    change_axes = views[1].figure.axes[-1]
    assert "pose change from input" in change_axes.get_xlabel()
    assert sum(p.get_height() for p in change_axes.patches) >= 0.98 * N_PARTICLES  # bins to the 99th percentile


@pytest.fixture(scope="module")
def pseudo_symmetric(project, tmp_path_factory):
    """A tiny C4 particle with one off-axis partner (24 px, 4 Å/px, 300 particles with half-sets),
    imported with the poses a C4 consensus leaves (the true poses turned by random mates); its
    C4-symmetrized map imported alone and with itself as both half-maps, and a soft spherical
    mask. Returns a dict: root, box, pixel_A, n, ops, truth (true poses), particles, reference,
    consensus (the symmetric map with half-maps), mask."""
    from pwem.protocols import ProtImportMask, ProtImportParticles, ProtImportVolumes
    from cryocv.io.particle_files import save_particles
    from cryocv.masks import spherical_mask
    from cryocv.relax import symmetrized
    from cryocv.symmetry import symmetry_operators
    root = tmp_path_factory.mktemp("scipion_relax")
    box, pixel_A, n = 24, 4.0, 300
    ops = symmetry_operators("C4")                 # a C4 core and one off-axis partner blob (as test_relax's)
    core = symmetrized(asymmetric_map(box, seed=8, n_atoms=40, sigma_px=1.2), ops) * len(ops)
    z, y, x = np.indices((box,) * 3).astype(np.float32) - box // 2
    partner = np.exp(-((x - 0.28 * box) ** 2 + y ** 2 + (z - 0.1 * box) ** 2) / (2 * 2.0 ** 2))
    truth_map = (core + 0.6 * core.max() * partner).astype(np.float32)
    simulate(truth_map, pixel_A, n, str(root), snr=2.0, seed=3, progress=False)
    truth = load_particles(str(root / "particles.star"))
    consensus = load_particles(str(root / "particles.star"))
    wrong = np.random.default_rng(4).integers(0, len(ops), n)
    consensus.euler_deg = matrix_to_euler(np.einsum("bij,bjk->bik", truth.rotations,
                                                    np.transpose(ops[wrong], (0, 2, 1))))
    save_particles(consensus, str(root / "consensus.star"))
    for name in ("symmetric", "symmetric_half1", "symmetric_half2"):
        write_map(str(root / f"{name}.mrc"), symmetrized(truth_map, ops), pixel_A)
    write_map(str(root / "sphere.mrc"), spherical_mask(box, box / 2 - 3, 2.0).astype(np.float32), pixel_A)
    particles = launch(project, project.newProtocol(
        ProtImportParticles, objLabel="import C4 consensus", importFrom=ProtImportParticles.IMPORT_FROM_RELION,
        starFile=str(root / "consensus.star"), samplingRate=pixel_A, voltage=300, sphericalAberration=2.7,
        amplitudeContrast=0.1)).outputParticles
    reference = launch(project, project.newProtocol(ProtImportVolumes, filesPath=str(root / "symmetric.mrc"),
                                                    samplingRate=pixel_A)).outputVolume
    with_halves = launch(project, project.newProtocol(
        ProtImportVolumes, objLabel="import C4 consensus with half-maps", filesPath=str(root / "symmetric.mrc"),
        samplingRate=pixel_A, setHalfMaps=True, half1map=str(root / "symmetric_half1.mrc"),
        half2map=str(root / "symmetric_half2.mrc"))).outputVolume
    mask = launch(project, project.newProtocol(ProtImportMask, maskPath=str(root / "sphere.mrc"),
                                               samplingRate=pixel_A)).outputMask
    return dict(root=root, box=box, pixel_A=pixel_A, n=n, ops=ops, truth=truth, particles=particles,
                reference=reference, consensus=with_halves, mask=mask)


def test_refine_protocol_relaxes_a_pseudo_symmetric_particle(project, pseudo_symmetric):
    """The pseudo-symmetric particle imported with C4-consensus poses and a C4-symmetric start:
    relaxing C4 with Break symmetry first, 2 iterations on the CPU, puts nearly every particle back
    in its true mate (up to one global operator); the difference map is registered (the partner
    shows in it), and summary, methods and viewer (difference-map slices, change from the input
    poses, mate occupancy) report the relaxation."""
    from cryocv.jobs import jobdir
    from cryocv.protocols import ProtCryocvRefine
    from cryocv.protocols.protocol_relaxation import relaxChoice
    from cryocv.relax import mode_of, symmetrized
    from cryocv.viewers import CryocvViewer
    data = pseudo_symmetric
    root, box, pixel_A, n, ops, truth = (data[k] for k in ("root", "box", "pixel_A", "n", "ops", "truth"))
    particles, reference = data["particles"], data["reference"]
    protocol = project.newProtocol(ProtCryocvRefine, objLabel="cryocv refine, C4 relaxed", symmetryGroup="C4",
                                   relax=relaxChoice("maximize"), breakSymmetry=True, regularizer=1,
                                   initialLowpass=16.0, maxIterations=2, useGpu=False)
    protocol.inputParticles.set(particles)
    protocol.referenceVolume.set(reference)
    assert protocol.validate() == []
    args = protocol._refineArgs()
    assert args[args.index("--relax") + 1] == "maximize" and "--break-symmetry" in args
    launch(project, protocol)

    out = protocol.outputParticles
    assert out.getSize() == n and out.hasAlignmentProj()
    modes = mode_of(scipion_poses(out, str(root)).rotations, truth.rotations, ops)
    wall_s = jobdir.read_json(protocol._jobPath(jobdir.JOB_JSON))["wall_time_s"]
    print(f"Scipion C4 relaxation ({wall_s:.0f} s job): fraction per mate of the truth "
          f"{np.bincount(modes, minlength=4) / n}")
    assert np.bincount(modes, minlength=4).max() / n >= 0.8       # one global operator for nearly all
    difference = protocol.outputDifferenceMap
    assert difference.getFileName() == protocol._jobPath(jobdir.DIFFERENCE_MAP)
    assert difference.getSamplingRate() == pytest.approx(pixel_A) and difference.getDim() == (box, box, box)
    difference_map, difference_pixel_A = read_map(difference.getFileName())
    relaxed, _ = read_map(protocol.outputVolume.getFileName())
    assert difference_pixel_A == pytest.approx(pixel_A)
    np.testing.assert_allclose(difference_map, relaxed - symmetrized(relaxed, ops),
                               atol=1e-4 * np.abs(relaxed).max())
    assert np.abs(difference_map).max() > 0.05 * np.abs(relaxed).max()
    assert difference.getObjId() in {o.getObjId() for o in project.getSourceChilds(protocol.outputVolume)}
    relax = protocol._fscReport()["relax"]
    assert relax["group"] == "C4" and relax["mode"] == "maximize" and len(relax["mode_occupancy"]) == 4
    assert 60 < relax["change_from_input_median_deg"] < 120           # 3 in 4 input poses were a 90-270° mate off
    summary = protocol.summary()
    print("\n".join(summary + protocol.methods()))
    assert "Symmetry relaxed (maximize) over the C4 mates, maps in C1" in summary[1]
    assert f"median change from the input poses {relax['change_from_input_median_deg']:.1f}°" in summary[1]
    assert "outputDifferenceMap" in summary[1] and "CPU" in summary[2]
    assert "C4 symmetry was relaxed" in protocol.methods()[0]
    # the viewer: FSC, poses, then the relaxation (3 difference-map slices, change histogram, occupancy bars)
    views = CryocvViewer(project=project, protocol=protocol)._visualize(protocol)
    assert len(views) == 3
    axes = views[2].figure.axes
    assert len(axes) == 7 and all("difference map" in a.get_title() for a in axes[:3])   # + the agreement's twin axis
    assert axes[5].get_title() == "mode switching, half-map agreement" and len(axes[5].lines[0].get_xdata()) >= 1
    agreement = [h["asymmetric_agreement"] for h in protocol._fscReport()["iterations"] if "asymmetric_agreement" in h]
    assert agreement and list(axes[6].lines[0].get_ydata()) == pytest.approx(agreement)
    assert "relaxed vs input pose" in axes[3].get_xlabel() and sum(p.get_height() for p in axes[3].patches) == n
    np.testing.assert_allclose([p.get_height() for p in axes[4].patches], relax["mode_occupancy"])
    path = str(root / "relax_view.png")
    views[2].figure.savefig(path)
    assert matplotlib_image(path)[..., :3].std() > 0.05


def test_local_refine_validates_relaxation(project, pseudo_symmetric):
    """Local refinement's Relax symmetry is checked as the refinement's: relaxing needs a Symmetry
    other than C1, Break symmetry first needs relaxing, and the core's relaxation errors come back
    in the form's words."""
    from cryocv.protocols import ProtCryocvLocalRefine
    from cryocv.protocols.protocol_relaxation import relaxChoice
    data = pseudo_symmetric

    def local(**values):
        protocol = project.newProtocol(ProtCryocvLocalRefine, **values)
        protocol.inputParticles.set(data["particles"])
        protocol.inputVolume.set(data["consensus"])
        protocol.refMask.set(data["mask"])
        return protocol
    assert local().validate() == []
    for mode in ("maximize", "marginalize"):
        errors = local(relax=relaxChoice(mode)).validate()        # the default symmetry, C1
        assert len(errors) == 1 and "Relax symmetry relaxes the Symmetry" in errors[0] and "not C1" in errors[0], \
            (mode, errors)
        assert local(relax=relaxChoice(mode), symmetryGroup="c1").validate() == errors
        assert local(relax=relaxChoice(mode), symmetryGroup="C4", breakSymmetry=True).validate() == []
    errors = local(symmetryGroup="C4", breakSymmetry=True).validate()
    assert len(errors) == 1 and "Break symmetry first is set but Relax symmetry is off" in errors[0], errors
    errors = local(relax=relaxChoice("marginalize"), symmetryGroup="C4", relaxMaxAlignRes=-4.0).validate()
    assert len(errors) == 1 and "Max. resolution for the mate choice must be positive" in errors[0], errors


def test_local_refine_protocol_relaxes_by_marginalization(project, pseudo_symmetric):
    """The pseudo-symmetric particle's C4-consensus poses and symmetric half-maps, locally refined
    with Relax symmetry: marginalize and Break symmetry first (3 iterations on the CPU): the command
    line says so, nearly every particle ends in one mate of its truth (one global operator) with its
    change from the nearest input mate inside the extent, the difference map is registered, and
    summary, methods and viewer (FSC, pose change, then the relaxation plot) report it."""
    from cryocv.jobs import jobdir
    from cryocv.protocols import ProtCryocvLocalRefine
    from cryocv.protocols.protocol_relaxation import relaxChoice
    from cryocv.relax import mode_of, symmetrized
    from cryocv.viewers import CryocvViewer
    data = pseudo_symmetric
    root, box, pixel_A, n, ops, truth = (data[k] for k in ("root", "box", "pixel_A", "n", "ops", "truth"))
    extent_deg = 8.0
    protocol = project.newProtocol(ProtCryocvLocalRefine, objLabel="cryocv local refine, C4 marginalized",
                                   symmetryGroup="C4", relax=relaxChoice("marginalize"), breakSymmetry=True,
                                   rotationExtent=extent_deg, shiftExtent=6.0, fulcrum=1, initialLowpass=16.0,
                                   maxIterations=3, useGpu=False)
    protocol.inputParticles.set(data["particles"])
    protocol.inputVolume.set(data["consensus"])
    protocol.refMask.set(data["mask"])
    assert protocol.validate() == []
    args = protocol._localRefineArgs()
    assert args[args.index("--relax") + 1] == "marginalize" and "--break-symmetry" in args
    assert args[args.index("--sym") + 1] == "C4"
    launch(project, protocol)

    out = protocol.outputParticles
    assert out.getSize() == n and out.hasAlignmentProj()
    modes = mode_of(scipion_poses(out, str(root)).rotations, truth.rotations, ops)
    print(f"Scipion C4 local relaxation (marginalize): fraction per mate of the truth "
          f"{np.bincount(modes, minlength=4) / n}")
    assert np.bincount(modes, minlength=4).max() / n >= 0.8       # one global operator for nearly all
    report = protocol._fscReport()
    assert report["map_symmetry"] == "C1" and report["symmetry"] == "C4"
    assert report["local"]["rotation_change_median_deg"] < extent_deg
    difference = protocol.outputDifferenceMap
    assert difference.getFileName() == protocol._jobPath(jobdir.DIFFERENCE_MAP)
    assert difference.getSamplingRate() == pytest.approx(pixel_A) and difference.getDim() == (box, box, box)
    difference_map, _ = read_map(difference.getFileName())
    relaxed, _ = read_map(protocol.outputVolume.getFileName())
    np.testing.assert_allclose(difference_map, relaxed - symmetrized(relaxed, ops),
                               atol=1e-4 * np.abs(relaxed).max())
    assert np.abs(difference_map).max() > 0.05 * np.abs(relaxed).max()
    assert difference.getObjId() in {o.getObjId() for o in project.getSourceChilds(protocol.outputVolume)}
    relax = report["relax"]
    assert relax["group"] == "C4" and relax["mode"] == "marginalize" and len(relax["mode_occupancy"]) == 4
    summary = protocol.summary()
    print("\n".join(summary + protocol.methods()))
    assert "Symmetry relaxed (marginalize) over the C4 mates, maps in C1" in summary[3]
    assert f"median change from the input poses {relax['change_from_input_median_deg']:.1f}°" in summary[3]
    assert "outputDifferenceMap" in summary[3] and "CPU" in summary[4]
    methods = protocol.methods()[0]
    assert "C4 symmetry was relaxed" in methods and "marginalization within the mode" in methods
    # the viewer: FSC, pose change, then the relaxation (3 difference-map slices, change histogram, occupancy)
    views = CryocvViewer(project=project, protocol=protocol)._visualize(protocol)
    assert len(views) == 3
    assert "rotation change" in views[1].figure.axes[0].get_xlabel()
    axes = views[2].figure.axes
    assert len(axes) == 7 and all("difference map" in a.get_title() for a in axes[:3])   # + the agreement's twin axis
    assert axes[5].get_title() == "mode switching, half-map agreement" and len(axes[5].lines[0].get_xdata()) >= 1
    agreement = [h["asymmetric_agreement"] for h in protocol._fscReport()["iterations"] if "asymmetric_agreement" in h]
    assert agreement and list(axes[6].lines[0].get_ydata()) == pytest.approx(agreement)
    assert "C4 relaxed (marginalize)" in views[2].figure.get_suptitle()
    assert "relaxed vs input pose" in axes[3].get_xlabel() and sum(p.get_height() for p in axes[3].patches) == n
    np.testing.assert_allclose([p.get_height() for p in axes[4].patches], relax["mode_occupancy"])
    path = str(root / "local_relax_view.png")
    views[2].figure.savefig(path)
    assert matplotlib_image(path)[..., :3].std() > 0.05


def readme_script():
    """The project-scripting example of README.md (the python block after its marker)."""
    readme = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "README.md")
    if not os.path.exists(readme):
        pytest.skip("README.md not beside the tests (installed package)")
    text = open(readme).read()
    block = text.split("<!-- scipion-script -->", 1)[1]
    return block.split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_script_refines_relion_particles_on_a_fresh_account(dataset, tmp_path):
    """README's script, run as a new user would (no SCIPION_* variables, empty home):
    Scipion lists the plugin, the STAR file is imported, ProtCryocvRefine runs and the FSC
    plot is saved; the map it made is checked against the truth."""
    import subprocess
    import sys
    import matplotlib.image
    root, truth = dataset
    script = tmp_path / "refine_in_scipion.py"
    script.write_text(readme_script())
    # optics other than the import form's defaults (300 kV, 2.7 mm, 0.1) must reach Scipion
    tables = starfile.read(str(root / "sim" / "particles_random_poses.star"), always_dict=True)
    tables["optics"]["rlnSphericalAberration"] = 2.0
    tables["optics"]["rlnAmplitudeContrast"] = 0.07
    starfile.write(tables, str(root / "sim" / "particles_cs2.star"), overwrite=True)
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCIPION_")}
    env.update(HOME=str(home), MPLBACKEND="Agg")
    relative = [os.path.relpath(str(p), str(tmp_path)) for p in (root / "sim" / "particles_cs2.star",
                                                                 root / "start.mrc")]
    result = subprocess.run([sys.executable, str(script)] + relative + [
        "--pixel-size-A", str(PIXEL_A), "--iterations", "2", "--cpu"],
        cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "cryocv" in result.stdout.split("Scipion plugins:")[1].splitlines()[0]
    assert f"Imported {N_PARTICLES} particles: 300 kV, Cs 2 mm, amplitude contrast 0.07" in result.stdout
    assert "NU refinement:" in result.stdout and "Å gold-standard resolution" in result.stdout
    png = result.stdout.split("FSC plot:")[1].strip().splitlines()[0]
    assert matplotlib.image.imread(png)[..., :3].std() > 0.05
    project = home / "ScipionUserData" / "projects" / "cryocv_refine"
    maps = list(project.glob("Runs/*ProtCryocvRefine/extra/job/map.mrc"))
    assert len(maps) == 1 and vs_truth_A(str(maps[0]), truth) < 9.0
