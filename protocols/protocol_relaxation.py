"""Symmetry relaxation in the cryocv refinement protocols (``--relax maximize|marginalize`` of
``cryocv refine`` and ``cryocv local-refine``): the form section, its CLI arguments and Params
fields, its checks, the difference-map output and the summary and methods lines, shared by
ProtCryocvRefine and ProtCryocvLocalRefine through :class:`CryocvRelaxationMixin`."""
import pyworkflow.protocol.params as params
from pwem.objects import Volume

from cryocv.jobs import jobdir
from cryocv.jobs.refine import RELAX_MODES
from cryocv.symmetry import parse_symmetry

RELAX_CHOICES = ["off" if mode is None else mode for mode in RELAX_MODES]   # the form's Relax symmetry choices
RELAX_OFF = RELAX_MODES.index(None)
RELAX_OUTPUTS = {"outputDifferenceMap": Volume}          # for the protocols' _possibleOutputs
# CLI flags in the core's parameter errors -> the form's labels (longer flags first: "--relax" is a prefix)
RELAX_FORM_LABELS = {"--relax-max-align-res-A": "Max. resolution for the mate choice",
                     "--extra-final-passes": "Extra final passes", "--break-symmetry": "Break symmetry first",
                     "--relax": "Relax symmetry"}


def relaxChoice(mode):
    """The form's Relax symmetry value (an index into RELAX_CHOICES) of a core mode (None: off)."""
    return RELAX_MODES.index(mode)


class CryocvRelaxationMixin:
    """Symmetry relaxation for a refinement protocol with a ``symmetryGroup`` and ``inputParticles``
    (put before CryocvProtocolBase). The protocol builds its Params with
    ``**self._relaxationFields(ParamsClass)``, adds ``self._relaxationArgs(params)`` to its CLI
    arguments, ``self._relaxationErrors()`` to _validate, calls ``self._defineDifferenceMapOutput``
    in its output step and uses the summary and methods lines."""

    # -------------------------- form ----------------------------------------
    @staticmethod
    def _defineRelaxationParams(form, paramsClass):
        """The "Symmetry relaxation" section, defaults from ``paramsClass`` (the job's Params dataclass)."""
        form.addSection(label="Symmetry relaxation")
        form.addParam("relax", params.EnumParam, choices=RELAX_CHOICES, default=relaxChoice(paramsClass.relax),
                      display=params.EnumParam.DISPLAY_HLIST, label="Relax symmetry",
                      help="For pseudo-symmetric particles (a symmetric core with an asymmetric part: a bound "
                           "partner, a ligand in one of the subunits, a broken ring): the map is reconstructed in "
                           "C1 while each particle chooses among the mates of its pose under the Symmetry of the "
                           "Input tab (the poses a symmetric map cannot tell apart). maximize: each particle takes "
                           "the best mate against the C1 references. marginalize: as maximize, then weighs the "
                           "poses around the chosen mate by likelihood (the particle still contributes to one "
                           "mode only). The Symmetry must then be the pseudo-symmetry (e.g. C4), not C1. Typical "
                           "input: the particles and map of a symmetric (C4) refinement; in a local refinement "
                           "the extents hold modulo the group (each particle is searched around the mate of its "
                           "input pose nearest its last pose). An extra output is the difference map: the relaxed "
                           "map minus its symmetrized version.")
        form.addParam("breakSymmetry", params.BooleanParam, default=paramsClass.break_symmetry,
                      condition=f"relax != {RELAX_OFF} or breakSymmetry", label="Break symmetry first",
                      help="Start from C1 half-maps of the input poses, each particle turned by a random mate, "
                           "instead of the (symmetric) reference: the asymmetric part then has a start to grow "
                           "from. Needs input particles with an alignment (projection poses), e.g. those of a "
                           "symmetric refinement.")
        form.addParam("relaxMaxAlignRes", params.FloatParam, default=paramsClass.relax_max_align_res_A,
                      allowsNull=True, condition=f"relax != {RELAX_OFF}",
                      label="Max. resolution for the mate choice (Å)",
                      help="The choice among the mates never aligns finer than this resolution (e.g. about the "
                           "size of the asymmetric feature's signal); empty: as the alignment.")
        form.addParam("extraFinalPasses", params.IntParam, default=paramsClass.extra_final_passes,
                      condition=f"relax != {RELAX_OFF}", label="Extra final passes",
                      help="Passes aligned to Nyquist after the final one, letting the mate choices settle at "
                           "full resolution.")

    def _relaxMode(self):
        """The core's --relax mode of the form (None: off)."""
        return RELAX_MODES[self.relax.get()]

    def _relaxationFields(self, paramsClass):
        """The relaxation fields of the job's Params (``paramsClass``) from the form. The options
        hidden while Relax symmetry is off are not used then (the job's defaults); Break symmetry
        first is kept (it stays visible while set, and _relaxationErrors reports it)."""
        mode = self._relaxMode()
        return dict(relax=mode, break_symmetry=bool(self.breakSymmetry.get()),
                    relax_max_align_res_A=(self.relaxMaxAlignRes.get() if mode is not None
                                           else paramsClass.relax_max_align_res_A),
                    extra_final_passes=(self.extraFinalPasses.get() if mode is not None
                                        else paramsClass.extra_final_passes))

    @staticmethod
    def _relaxationArgs(jobParams):
        """CLI arguments of the relaxation fields of ``jobParams``, only those set (an unchanged
        form gives the arguments it gave before relaxation existed)."""
        args = []
        if jobParams.relax is not None:
            args += ["--relax", jobParams.relax]
        if jobParams.break_symmetry:
            args.append("--break-symmetry")
        if jobParams.relax_max_align_res_A is not None:
            args += ["--relax-max-align-res-A", jobParams.relax_max_align_res_A]
        if jobParams.extra_final_passes != type(jobParams).extra_final_passes:
            args += ["--extra-final-passes", jobParams.extra_final_passes]
        return args

    # -------------------------- outputs -------------------------------------
    def _defineDifferenceMapOutput(self, volume):
        """When relaxing: register the job's difference map (the relaxed ``volume`` minus its
        symmetrized version) as outputDifferenceMap, derived from ``volume``."""
        if self._relaxMode() is None:
            return
        difference = Volume(objLabel=f"{self.getRunName()} (relaxed map minus its symmetrized version)")
        difference.setFileName(self._jobPath(jobdir.DIFFERENCE_MAP))
        difference.setSamplingRate(volume.getSamplingRate())
        self._defineOutputs(outputDifferenceMap=difference)
        self._defineSourceRelation(volume, difference)

    # -------------------------- info ----------------------------------------
    def _relaxationErrors(self):
        errors, parts = [], self.inputParticles.get()
        relaxing = self._relaxMode() is not None
        if self.breakSymmetry.get() and not relaxing:
            errors.append("Break symmetry first is set but Relax symmetry is off: it only applies when relaxing "
                          "(choose a Relax symmetry mode, or clear Break symmetry first).")
        elif self.breakSymmetry.get() and parts is not None and not parts.hasAlignmentProj():
            errors.append("Break symmetry first needs input particles with an alignment (projection poses), e.g. "
                          "those of a symmetric refinement: these have none (clear it, or refine them first).")
        if relaxing:
            try:
                trivial = parse_symmetry(self.symmetryGroup.get() or "") == "C1"
            except ValueError:
                trivial = False                     # _validateCommon reports the symmetry
            if trivial:
                errors.append("Relax symmetry relaxes the Symmetry of the Input tab: set it to the "
                              "pseudo-symmetry (e.g. C4), not C1.")
        return errors

    @staticmethod
    def _relaxationSummary(report):
        """The summary line of fsc.json's ``relax`` record (``report``: the job's fsc.json), or []."""
        relax = (report or {}).get("relax")
        if not relax:
            return []
        line = f"Symmetry relaxed ({relax['mode']}) over the {relax['group']} mates, maps in C1"
        if relax.get("mode_occupancy") is not None:
            occupancy = " / ".join(f"{100 * f:.0f}" for f in relax["mode_occupancy"])
            line += (f"; median change from the input poses {relax['change_from_input_median_deg']:.1f}°, "
                     f"particles per mate of the input pose {occupancy} %")
        return [line + "; the relaxed map minus its symmetrized version is outputDifferenceMap."]

    @staticmethod
    def _relaxationMethods(report):
        """The methods sentence (with a leading space) of fsc.json's ``relax`` record, or ""."""
        relax = (report or {}).get("relax")
        if not relax:
            return ""
        marginalized = (", the poses around that mate weighted by their likelihood (marginalization within the "
                        "mode)" if relax["mode"] == "marginalize" else "")
        return (f" The {relax['group']} symmetry was relaxed: the maps were reconstructed in C1 while each "
                f"particle took the best of the {relax['group']} mates of its pose against them{marginalized}.")
