"""What the cryocv protocols share: input conversion (particles to RELION 3.1 STAR
through ``relion.convert``), running the ``cryocv`` CLI with ``runJob``, and reading
a job folder (map, half-maps, ``fsc.json``) back as Scipion objects."""
import json
import os

import pyworkflow.protocol.params as params
from pwem.constants import ALIGN_PROJ
from pwem.objects import FSC, Volume
from pyworkflow.protocol.constants import GPU_LIST, USE_GPU

from cryocv.jobs import jobdir
from cryocv.symmetry import DEFAULT_SYMMETRY, parse_symmetry

JOB_FOLDER = "job"
PARTICLES_STAR = "input_particles.star"


class CryocvProtocolBase:
    """Mixin for the cryocv protocols (put before the pwem protocol class)."""

    _label = None

    # -------------------------- form pieces ---------------------------------
    @staticmethod
    def _defineSymmetryParam(form):
        form.addParam("symmetryGroup", params.StringParam, default=DEFAULT_SYMMETRY, label="Symmetry",
                      help="Point group imposed, RELION's conventions: C1, Cn, Dn, T, O, I (I1-I4), "
                           "e.g. C4 for a tetrameric channel.")

    @staticmethod
    def _defineComputeParams(form):
        form.addHidden(USE_GPU, params.BooleanParam, default=True,
                       label="Use GPU",
                       help="Run on the GPU (CuPy) when the core finds one; otherwise, and with No, on the CPU.")
        form.addHidden(GPU_LIST, params.StringParam, default="0", label="GPU IDs",
                       help="GPU to run on (the first of the list; multi-GPU runs are not implemented yet). "
                            "The job sees only these GPUs (CUDA_VISIBLE_DEVICES).")

    # -------------------------- paths ---------------------------------------
    def _jobPath(self, *names):
        return self._getExtraPath(JOB_FOLDER, *names)

    def _particlesStar(self):
        return self._getExtraPath(PARTICLES_STAR)

    # -------------------------- steps ---------------------------------------
    def _writeParticles(self, alignType):
        """The input particles as RELION 3.1 STAR; MRC stacks are linked into extra/,
        other formats (SPIDER, Xmipp .stk, ...) converted to MRC stacks there."""
        import relion.convert
        parts = self.inputParticles.get()
        mrc = all(f.split(":")[0].endswith((".mrc", ".mrcs")) for f in parts.getFiles())
        relion.convert.writeSetOfParticles(parts, self._particlesStar(), outputDir=self._getExtraPath(),
                                           alignType=alignType, forceConvert=not mrc)

    def _runCryocv(self, command, args):
        """``cryocv COMMAND ARGS --device …`` through runJob, in the core's environment.

        With *Use GPU* the job sees only the protocol's GPUs (CUDA_VISIBLE_DEVICES);
        under a queue the scheduler sets CUDA_VISIBLE_DEVICES itself and it is left alone.
        The core runs on the GPU when CuPy finds one there, else on the CPU (the summary
        says which). bash runs the command, so CRYOCV_ACTIVATION may use bash syntax.
        """
        from cryocv import Plugin
        useGpu = bool(self.useGpu)
        args = [command] + [str(a) for a in args] + ["--device", "auto" if useGpu else "cpu", "--quiet"]
        program = Plugin.getProgram(gpu=useGpu and not self.useQueue())
        self.runJob(program, args, env=Plugin.getEnviron(), numberOfMpi=1, executable="/bin/bash")

    # -------------------------- outputs -------------------------------------
    def _fscReport(self):
        """The job's ``fsc.json`` as a dict, or None before the job has written it."""
        path = self._jobPath(jobdir.FSC_JSON)
        if not os.path.exists(path):
            return None
        with open(path) as handle:
            return json.load(handle)

    def _createOutputVolume(self, samplingRate):
        volume = Volume()
        volume.setFileName(self._jobPath(jobdir.MAP))
        volume.setSamplingRate(samplingRate)
        volume.setHalfMaps([self._jobPath(name) for name in jobdir.HALF_MAPS])
        return volume

    def _createOutputFsc(self):
        """Half-map FSC of the job: the masked, phase-randomization-corrected curve
        (the one ``resolution_A`` is read from) or the unmasked one without a mask."""
        report = self._fscReport()
        curve = "fsc_corrected" if "fsc_corrected" in report else "fsc_unmasked"
        fsc = FSC(objLabel=f"{self.getRunName()} ({'masked, corrected' if curve == 'fsc_corrected' else 'unmasked'})")
        fsc.setData([float(f) for f in report["frequency_per_A"]], [float(v) for v in report[curve]])
        return fsc

    # -------------------------- info ----------------------------------------
    def _validateCommon(self):
        errors = []
        if self.useGpu and not self.useQueue() and not self.getGpuList():
            errors.append("Use GPU is set but the GPU IDs are empty: give at least one (e.g. 0).")
        if hasattr(self, "symmetryGroup"):
            try:
                parse_symmetry(self.symmetryGroup.get() or "")
            except ValueError as exc:
                errors.append(f"Symmetry: {exc}")
        parts = self.inputParticles.get()
        if parts is not None and parts.getSize() < 4:
            errors.append(f"Only {parts.getSize()} particles: a gold-standard job needs at least 2 per half-set.")
        return errors

    def _deviceSentence(self):
        """Where the job ran, from its job.json (None before it has run)."""
        path = self._jobPath(jobdir.JOB_JSON)
        if not os.path.exists(path):
            return None
        with open(path) as handle:
            device = json.load(handle).get("device", "")
        if self.useGpu and device == "cpu":
            return ("Ran on the CPU although Use GPU was set: CuPy found no GPU in the core's environment "
                    "(pip install 'cryocv[gpu]' there, or set CRYOCV_PYTHON).")
        return f"Ran on the {device.upper()}." if device else None

    def _resolutionSentence(self):
        report = self._fscReport()
        if report is None or not os.path.exists(self._jobPath(jobdir.MAP)):
            return None
        return (f"{report['resolution_A']:.2f} Å gold-standard resolution (FSC 0.143, masked and "
                f"phase-randomization corrected) from {report['n_particles']} particles, {report['symmetry']}")


def setVoxelSize(path, samplingRate):
    """Write the pixel size (Å) into an MRC header in place."""
    import mrcfile
    with mrcfile.open(path, mode="r+") as mrc:
        mrc.voxel_size = samplingRate


def copyAlignment(inputSet, outputSet, starFile, newImages=False):
    """Copy ``inputSet`` into ``outputSet`` with the poses and half-sets of ``starFile``
    (rows matched on rlnImageId, which relion.convert writes from the object ids). Particles
    the job left out (unusable images, listed in its log) have no row and are not copied.
    ``newImages``: the particles' images become the file's rlnImageName (relative to the project
    folder) and the file's rlnImageOriginalName is kept as ``_rlnImageOriginalName``."""
    import relion.convert as convert
    from emtable import Table
    from pyworkflow.object import String
    from relion.constants import PARTICLE_EXTRA_LABELS

    reader = convert.createReader(alignType=ALIGN_PROJ, pixelSize=inputSet.getSamplingRate())
    first = [True]
    table = Table(fileName=starFile, tableName="particles", types=convert.LABELS_DICT)  # read once
    rows = {int(row.rlnImageId): row for row in table}
    if len(rows) != len(table) or len(rows) > inputSet.getSize():
        raise ValueError(f"{starFile} has {len(table)} particles ({len(rows)} distinct rlnImageId), "
                         f"the input set {inputSet.getSize()}")

    def updateParticle(particle, _row=None):
        row = rows.get(particle.getObjId())
        particle._appendItem = row is not None     # set every time: the iterator may reuse the object
        if row is None:
            return
        reader.setParticleTransform(particle, row)
        if newImages:
            particle.setLocation(convert.relionToLocation(row.rlnImageName))
            particle._rlnImageOriginalName = String(row.rlnImageOriginalName)
        if first[0]:
            reader.createExtraLabels(particle, row, PARTICLE_EXTRA_LABELS)
            first[0] = False
        else:
            reader.setExtraLabels(particle, row)

    outputSet.copyItems(inputSet, updateItemCallback=updateParticle, doClone=False)
