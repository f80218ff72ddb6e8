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

from .protocol_base import CryocvProtocolBase, copyAlignment, setVoxelSize

INPUT_HALF_MAPS = ("input_half_map_1.mrc", "input_half_map_2.mrc")   # the input half-maps, in extra/
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
        args = ["--particles", self._particlesStar(), "--half-maps"]
        args += [self._getExtraPath(name) for name in INPUT_HALF_MAPS]
        args += ["--keep-mask", self._getExtraPath(KEEP_MASK_MRC), "--out", self._jobPath()]
        if self.recenter:
            args.append("--recenter")
        if self.newBox.get() > 0:
            args += ["--new-box", self.newBox.get()]
        if not self.fitScale:
            args.append("--no-scale")
        return [str(a) for a in args]

    def convertInputStep(self):
        from pwem.emlib.image import ImageHandler
        self._writeParticles(ALIGN_PROJ)
        volume, mask = self.inputVolume.get(), self.refMask.get()
        for source, name in zip(volume.getHalfMaps().split(","), INPUT_HALF_MAPS):
            ImageHandler().convert(source, self._getExtraPath(name))
            setVoxelSize(self._getExtraPath(name), volume.getSamplingRate())
        ImageHandler().convert(mask, self._getExtraPath(KEEP_MASK_MRC))
        setVoxelSize(self._getExtraPath(KEEP_MASK_MRC), mask.getSamplingRate())

    def subtractStep(self, args):
        # the protocol owns its job folder: a rerun of the step replaces what an earlier run left there
        self._runCryocv("subtract", args + ["--overwrite"])

    def createOutputStep(self):
        parts = self.inputParticles.get()
        outParts = self._createSetOfParticles()
        outParts.copyInfo(parts)
        outParts.setAlignmentProj()
        copyAlignment(parts, outParts, self._jobPath(jobdir.PARTICLES_STAR), newImages=True)
        self._defineOutputs(outputParticles=outParts)
        self._defineTransformRelation(self.inputParticles, outParts)
        self._defineSourceRelation(self.inputVolume, outParts)
        self._defineSourceRelation(self.refMask, outParts)

    # -------------------------- INFO functions ------------------------------
    def _validate(self):
        errors = self._validateCommon()
        parts, volume, mask = self.inputParticles.get(), self.inputVolume.get(), self.refMask.get()
        if parts is not None and not parts.hasAlignmentProj():
            errors.append("The input particles have no 3D alignment (projection poses): refine them first.")
        if parts is not None and parts.getSize() and not parts.getFirstItem().hasAttribute("_rlnRandomSubset"):
            errors.append("The input particles have no half-sets (_rlnRandomSubset): subtraction uses each "
                          "particle's own half-map, so it needs the half-sets of the refinement that made them.")
        if volume is not None and not volume.hasHalfMaps():
            errors.append("The map has no half-maps: use the output map of a refinement (it carries them).")
        for what, item in (("map", volume), ("mask", mask)):
            if parts is None or item is None:
                continue
            if item.getXDim() != parts.getXDim():
                errors.append(f"The {what} is {item.getXDim()} px, the particles {parts.getXDim()} px.")
            if abs(item.getSamplingRate() - parts.getSamplingRate()) > 1e-3 * parts.getSamplingRate():
                errors.append(f"The {what} has {item.getSamplingRate():.4f} Å/px, the particles "
                              f"{parts.getSamplingRate():.4f} Å/px.")
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
