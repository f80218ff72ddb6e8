"""Viewers of the cryocv protocols: the half-map FSC curves and the pose diagnostics
(viewing-direction distribution, convergence, per-particle pose change from the input
alignment; for a local refinement, the rotation and shift change against the extents; for an
ab-initio job, also its resolution against iteration; for a refinement or local refinement
that relaxed its symmetry, the difference map and the mate choices), drawn by
:mod:`cryocv.plotting` into pyworkflow plotters from the job's files."""
from pyworkflow.gui.plotter import Plotter
from pyworkflow.viewer import DESKTOP_TKINTER, MSG_INFO, MessageView, Viewer

from cryocv.jobs import jobdir
from cryocv.plotting import (ABINITIO_FIGSIZE, FSC_FIGSIZE, POSE_CHANGE_FIGSIZE, RELAX_FIGSIZE, draw_abinitio,
                             draw_fsc, draw_pose_change, draw_poses, draw_relaxation, history_series,
                             poses_figsize)

from ..protocols import ProtCryocvAbinitio, ProtCryocvLocalRefine, ProtCryocvReconstruct, ProtCryocvRefine
from ..protocols.protocol_relaxation import CryocvRelaxationMixin


def fscPlotter(protocol):
    """Plotter (its ``figure`` a matplotlib Figure) of the protocol's gold-standard FSC curves."""
    report = protocol._fscReport()
    if report is None:
        raise FileNotFoundError(f"{protocol.getRunName()} has no FSC yet ({protocol._jobPath(jobdir.FSC_JSON)})")
    plotter = Plotter(figsize=FSC_FIGSIZE, windowTitle=f"{protocol.getRunName()}: FSC")
    where = " in the mask" if "local" in report else ""
    draw_fsc(plotter.figure, report, title=f"{protocol.getRunName()}: {report['resolution_A']:.2f} Å{where} "
                                           f"({report['n_particles']} particles, {report['symmetry']})")
    return plotter


def posesPlotter(protocol):
    """Plotter of a refinement's pose diagnostics."""
    from cryocv.jobs.refine import refine_pose_diagnostics
    diagnostics = refine_pose_diagnostics(protocol._jobPath(), protocol._particlesStar())
    plotter = Plotter(figsize=poses_figsize(diagnostics["change_vs_input_deg"] is not None),
                      windowTitle=f"{protocol.getRunName()}: poses")
    draw_poses(plotter.figure, **diagnostics)
    return plotter


def poseChangePlotter(protocol):
    """Plotter of a local refinement's rotation and shift change from the input poses (histograms,
    extents marked), computed from the job's particles and the protocol's input."""
    from cryocv.jobs.local_refine import pose_change_diagnostics
    diagnostics = pose_change_diagnostics(protocol._jobPath(), protocol._particlesStar())
    plotter = Plotter(figsize=POSE_CHANGE_FIGSIZE, windowTitle=f"{protocol.getRunName()}: pose change")
    draw_pose_change(plotter.figure, **diagnostics)
    return plotter


def abinitioPlotter(protocol):
    """Plotter of an ab-initio job's resolution against iteration (the figure the job saves as
    its abinitio.png): per half-set the SGD's alignment and quarter-set FSC resolution, the FSC
    of the aligned half-maps, then the E/M iterations, from the job's fsc.json."""
    report = protocol._fscReport()
    plotter = Plotter(figsize=ABINITIO_FIGSIZE, windowTitle=f"{protocol.getRunName()}: ab-initio")
    draw_abinitio(plotter.figure, report.get("sgd") or [], report.get("iterations") or [],
                  title=f"{protocol.getRunName()}: {report['resolution_A']:.2f} Å ({report['n_particles']} "
                        f"particles, {report['symmetry']})")
    return plotter


def relaxationPlotter(protocol):
    """Plotter of a symmetry-relaxed refinement or local refinement (the figure the job saves as
    its relax.png): the central slices of its difference map (relaxed map minus its symmetrized
    version) and, when the input had poses, each particle's angle between its relaxed and its input
    pose and the fraction of particles in each mate of the input pose (fsc.json's ``relax`` record)."""
    from cryocv.geometry import angular_distance_deg
    from cryocv.io.mrc import read_map
    from cryocv.io.particle_files import load_particles
    relax = protocol._fscReport()["relax"]
    difference, _ = read_map(protocol._jobPath(jobdir.DIFFERENCE_MAP))
    occupancy, change = relax.get("mode_occupancy"), None
    if occupancy is not None:             # the input had poses: the change from them, as the job measured it
        refined = load_particles(protocol._jobPath(jobdir.PARTICLES_STAR))
        start = load_particles(protocol._particlesStar())          # metadata only: images are not read
        if start.has_alignment and len(start) == len(refined):    # else some images were left out: no pairing
            change = angular_distance_deg(refined.rotations, start.rotations)
    history = protocol._fscReport().get("iterations") or []
    plotter = Plotter(figsize=RELAX_FIGSIZE, windowTitle=f"{protocol.getRunName()}: symmetry relaxation")
    draw_relaxation(plotter.figure, difference, change, occupancy, relax["group"],
                    title=f"{protocol.getRunName()}: {relax['group']} relaxed ({relax['mode']}), maps in C1",
                    mode_switch=history_series(history, "mode_switch_fraction"),
                    agreement=history_series(history, "asymmetric_agreement"))
    return plotter


class CryocvViewer(Viewer):
    """FSC curves (unmasked, masked, phase-randomized, corrected; 0.143 line); for a
    refinement, the angular distribution and the pose change from the input alignment; for a
    local refinement, the rotation and shift change from the input poses against the extents;
    for an ab-initio job, the angular distribution and the resolution against iteration; for a
    refinement or local refinement that relaxed its symmetry, then the difference map, the pose
    change from the input and the mate occupancy."""
    _label = "cryocv FSC and poses"
    _targets = [ProtCryocvRefine, ProtCryocvLocalRefine, ProtCryocvReconstruct, ProtCryocvAbinitio]
    _environments = [DESKTOP_TKINTER]

    def _visualize(self, obj, **kwargs):
        if obj._fscReport() is None:
            return [MessageView(f"{obj.getRunName()} has no results yet.", title="cryocv", msgType=MSG_INFO)]
        views = [fscPlotter(obj)]
        if isinstance(obj, ProtCryocvRefine):
            views.append(posesPlotter(obj))
        elif isinstance(obj, ProtCryocvAbinitio):
            views += [posesPlotter(obj), abinitioPlotter(obj)]
        elif isinstance(obj, ProtCryocvLocalRefine):
            views.append(poseChangePlotter(obj))
        if isinstance(obj, CryocvRelaxationMixin) and "relax" in obj._fscReport():
            views.append(relaxationPlotter(obj))
        return views
