"""Viewers of the cryocv protocols: the half-map FSC curves and the pose diagnostics
(viewing-direction distribution, convergence, per-particle pose change from the input
alignment), drawn by :mod:`cryocv.plotting` into pyworkflow plotters."""
from pyworkflow.gui.plotter import Plotter
from pyworkflow.viewer import DESKTOP_TKINTER, MSG_INFO, MessageView, Viewer

from cryocv.jobs import jobdir
from cryocv.plotting import FSC_FIGSIZE, draw_fsc, draw_poses, poses_figsize

from ..protocols import ProtCryocvReconstruct, ProtCryocvRefine


def fscPlotter(protocol):
    """Plotter (its ``figure`` a matplotlib Figure) of the protocol's gold-standard FSC curves."""
    report = protocol._fscReport()
    if report is None:
        raise FileNotFoundError(f"{protocol.getRunName()} has no FSC yet ({protocol._jobPath(jobdir.FSC_JSON)})")
    plotter = Plotter(figsize=FSC_FIGSIZE, windowTitle=f"{protocol.getRunName()}: FSC")
    draw_fsc(plotter.figure, report, title=f"{protocol.getRunName()}: {report['resolution_A']:.2f} Å "
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


class CryocvViewer(Viewer):
    """FSC curves (unmasked, masked, phase-randomized, corrected; 0.143 line) and, for a
    refinement, the angular distribution and the pose change from the input alignment."""
    _label = "cryocv FSC and poses"
    _targets = [ProtCryocvRefine, ProtCryocvReconstruct]
    _environments = [DESKTOP_TKINTER]

    def _visualize(self, obj, **kwargs):
        if obj._fscReport() is None:
            return [MessageView(f"{obj.getRunName()} has no results yet.", title="cryocv", msgType=MSG_INFO)]
        views = [fscPlotter(obj)]
        if isinstance(obj, ProtCryocvRefine):
            views.append(posesPlotter(obj))
        return views
