//! Host DRAM memory device: NUMA classification, aligned and huge-page allocation, managed buffers.
