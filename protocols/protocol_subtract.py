"""ProtCryocvSubtract: particle signal subtraction with each particle's own half-map
(``cryocv subtract``; RELION's keep-mask semantics)."""
import json
import os

import pyworkflow.protocol.params as params
from pwem.constants import ALIGN_PROJ
from pwem.objects import SetOfParticles
from pwem.protocols import ProtOperateParticles

from cryocv.jobs import jobdir
from cryocv.jobs.subtract import MIN_BOX, SubtractParams

from .protocol_base import CryocvProtocolBase

KEEP_MASK_MRC = "keep_mask.mrc"                                      # the input mask, in extra/


class ProtCryocvSubtract(CryocvProtocolBase, ProtOperateParticles):
    """Subtract from each particle image the signal outside a mask: the half-map of the particle's
    own half-set, times (1 - mask), projected at the particle's pose, multiplied by its CTF and by a
    per-particle least-squares scale. The mask marks the density to KEEP (as RELION's particle
    subtraction). Optionally the images are re-centred on the mask's centre of mass (the poses
    follow, so a reconstruction of the output is centred there) and cropped to a smaller box.
    The output particles keep their poses, CTF and half-sets, and the original image of each in
    _rlnImageOriginalName."""
    _label = "particle subtraction"
    _possibleOutputs = {"outputParticles": SetOfParticles}

    def _defineParams(self, form):
        form.addSection(label="Input")
        form.addParam("inputParticles", params.PointerParam, pointerClass="SetOfParticles", important=True,
                      label="Input particles",
                      help="Particles with a 3D alignment (projection poses) and half-sets (_rlnRandomSubset), "
                           "e.g. from a cryocv or RELION refinement.")
        form.addParam("inputVolume", params.PointerParam, pointerClass="Volume", important=True,
                      label="Map with half-maps",
                      help="The refinement's map: its two half-maps are projected (each for its own "
                           "half-set). Same box and pixel size as the particles.")
        form.addParam("refMask", params.PointerParam, pointerClass="VolumeMask", important=True,
                      label="Mask of the density to keep",
                      help="Values in [0, 1]: 1 keeps, 0 subtracts (RELION's convention; a soft edge "
                           "helps). Same box and pixel size as the particles.")
        form.addSection(label="Output")
        form.addParam("recenter", params.BooleanParam, default=SubtractParams.recenter,
                      label="Re-centre on the mask?",
                      help="Move each image so that the projected centre of mass of the mask lies in the "
                           "box centre; the origins are updated so the poses stay consistent.")
        form.addParam("newBox", params.IntParam, default=-1, label="New box size (px)",
                      help=f"Crop the subtracted images to this even box (>= {MIN_BOX}); -1 keeps the box.")
        form.addParam("fitScale", params.BooleanParam, default=SubtractParams.fit_scale,
                      label="Fit a scale per particle?", expertLevel=params.LEVEL_ADVANCED,
                      help="Least-squares amplitude of the whole map's projection against each image (to the "
                           "half-maps' FSC 0.143 resolution); No subtracts with scale 1, as RELION does.")
        self._defineComputeParams(form)

    def _insertAllSteps(self):
        self._insertFunctionStep(self.convertInputStep)
        self._insertFunctionStep(self.subtractStep, self._subtractArgs())
        self._insertFunctionStep(self.createOutputStep)

    def _subtractArgs(self):
        args = ["--particles", self._particlesStar(), "--half-maps", *self._inputHalfMaps(),
                "--keep-mask", self._getExtraPath(KEEP_MASK_MRC), "--out", self._jobPath()]
        if self.recenter:
            args.append("--recenter")
        if self.newBox.get() > 0:
            args += ["--new-box", self.newBox.get()]
        if not self.fitScale:
            args.append("--no-scale")
        return [str(a) for a in args]

    def convertInputStep(self):
        self._writeParticles(ALIGN_PROJ)
        self._convertHalfMaps(self.inputVolume.get())
        mask = self.refMask.get()
        self._convertMap(mask, KEEP_MASK_MRC, mask.getSamplingRate())

    def subtractStep(self, args):
        # the protocol owns its job folder: a rerun of the step replaces what an earlier run left there
        self._runCryocv("subtract", args + ["--overwrite"])

    def createOutputStep(self):
        outParts = self._createOutputParticles(newImages=True)
        self._defineOutputs(outputParticles=outParts)
        self._defineTransformRelation(self.inputParticles, outParts)
        self._defineSourceRelation(self.inputVolume, outParts)
        self._defineSourceRelation(self.refMask, outParts)

    # -------------------------- INFO functions ------------------------------
    def _validate(self):
        errors = self._validateCommon()
        parts = self.inputParticles.get()
        errors += self._consensusErrors(self.inputVolume.get(), self.refMask.get(),
                                        "subtraction uses each particle's own half-map")
        box = self.newBox.get()
        if box is not None and box > 0 and (box % 2 or box < MIN_BOX or (parts is not None and box > parts.getXDim())):
            errors.append(f"New box size must be even, at least {MIN_BOX} and at most the particles' box "
                          f"(or -1 to keep it); got {box}.")
        return errors

    def _jobResult(self):
        path = self._jobPath(jobdir.JOB_JSON)
        if not os.path.exists(path) or not hasattr(self, "outputParticles"):
            return None
        with open(path) as handle:
            return json.load(handle).get("result")

    def _summary(self):
        result = self._jobResult()
        if result is None:
            return ["Output not ready yet."]
        lines = [f"Subtracted {result['n_particles']} particles (box {result['box_size']} px); per-particle "
                 f"scale median {result['scale_median']:.3f}, 5-95% {result['scale_p5_p95'][0]:.3f}-"
                 f"{result['scale_p5_p95'][1]:.3f}."]
        if result.get("recenter_xyz_A"):
            lines.append("Re-centred on the mask's centre of mass (%.1f, %.1f, %.1f) Å from the box centre."
                         % tuple(result["recenter_xyz_A"]))
        return lines + [self._deviceSentence()]

    def _methods(self):
        if self._jobResult() is None:
            return []
        return ["The signal outside a mask was subtracted from the particle images with cryocv: each particle's "
                "own half-map (gold-standard), masked, projected at its pose, CTF-modulated and scaled per particle."]
