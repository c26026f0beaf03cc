"""The descriptor pool of the generated modules (see generate.sh): theirs alone, so that
tritonclient's generated copies of the same .proto files can live in the same process."""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
