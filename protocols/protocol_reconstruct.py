"""ProtCryocvReconstruct: gold-standard reconstruction from given poses with the
``cryocv reconstruct`` CLI."""
import pyworkflow.protocol.params as params
from pwem.constants import ALIGN_PROJ
from pwem.objects import FSC, Volume
from pwem.protocols import ProtReconstruct3D

from cryocv.jobs.reconstruct import ReconstructParams

from .protocol_base import CryocvProtocolBase


class ProtCryocvReconstruct(CryocvProtocolBase, ProtReconstruct3D):
    """Reconstruct half-maps from particles with a 3D alignment (projection poses) and CTF,
    weight their average by the FSC, and report the masked, phase-randomization-corrected
    gold-standard FSC. Half-sets from _rlnRandomSubset when every particle has one,
    else a seeded random split."""
    _label = "reconstruct"
    _possibleOutputs = {"outputVolume": Volume, "outputFSC": FSC}

    def _defineParams(self, form):
        form.addSection(label="Input")
        form.addParam("inputParticles", params.PointerParam, pointerClass="SetOfParticles", important=True,
                      label="Input particles", help="Particles with a 3D alignment (projection poses).")
        self._defineSymmetryParam(form)
        form.addParam("seed", params.IntParam, default=ReconstructParams.seed, label="Random seed", expertLevel=params.LEVEL_ADVANCED,
                      help="Seed of the half-set split (when the input has none).")
        self._defineComputeParams(form)

    def _insertAllSteps(self):
        self._insertFunctionStep(self.convertInputStep)
        self._insertFunctionStep(self.reconstructStep)
        self._insertFunctionStep(self.createOutputStep)

    def convertInputStep(self):
        self._writeParticles(ALIGN_PROJ)

    def reconstructStep(self):
        # the protocol owns its job folder: a rerun of the step replaces what an earlier run left there
        self._runCryocv("reconstruct", ["--particles", self._particlesStar(), "--out", self._jobPath(),
                                        "--sym", self.symmetryGroup.get(), "--seed", self.seed.get(),
                                        "--overwrite"])

    def createOutputStep(self):
        volume = self._createOutputVolume(self.inputParticles.get().getSamplingRate())
        fsc = self._createOutputFsc()
        self._defineOutputs(outputVolume=volume, outputFSC=fsc)
        self._defineSourceRelation(self.inputParticles, volume)
        self._defineSourceRelation(volume, fsc)

    def _validate(self):
        errors = self._validateCommon()
        parts = self.inputParticles.get()
        if parts is not None and not parts.hasAlignmentProj():
            errors.append("The input particles have no 3D alignment (projection poses): refine them first, "
                          "e.g. with the cryocv 3D refinement.")
        return errors

    def _summary(self):
        sentence = self._resolutionSentence()
        return [f"Reconstruction: {sentence}.", self._deviceSentence()] if sentence else ["Output not ready yet."]

    def _warnings(self):
        parts = self.inputParticles.get()
        if parts is not None and not parts.hasCTF():
            return ["The particles have no CTF: the reconstruction will not correct for it."]
        return []

    def _methods(self):
        sentence = self._resolutionSentence()
        if sentence is None:
            return []
        return [f"Half-maps were reconstructed with cryocv from the given poses (gold-standard FSC "
                f"[Scheres2012], phase-randomization correction [Chen2013]): {sentence}."]

    def _citations(self):
        return ["Scheres2012", "Chen2013"]
