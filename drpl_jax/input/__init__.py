"""The input pipeline: prepared TFDS records -> grain -> global batches.

`pipeline` reads the array_record splits with grain, decodes, augments
(`augment`: the train and eval recipes) and batches them per host, joining
offline teacher logits by example id. Imports no TensorFlow or TFDS.
"""
