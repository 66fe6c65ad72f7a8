"""LoRA fine-tuning of the SAM3 engine on a clinic's own approved structure sets.

``cases`` reads and splits the training material (by patient, never by slice),
``samples`` turns it into the exact inputs the engine sees at inference,
``objectives`` holds SAM3's training losses (queries matched to ground-truth
instances, mask focal and Dice, box, presence and classification),
``trainer`` runs the optimisation with checkpoints and resume, ``adapter``
writes the folder the engine loads with its provenance, and ``report``
compares the engine with and without the adapter on the held-out patients.

Imports torch and peft: only ``oncoseg-node finetune`` loads it.
"""
