/* Vector table and reset handler of the Cortex-M4 test image (QEMU mps2-an386): copies .data,
 * clears .bss, enables the FPU, opens newlib's semihosting handles, runs main, exits through
 * semihosting. SysTick counts its wraps for the instruction counter of m4_main.c. */
#include <stdint.h>

extern uint32_t _sidata, _sdata, _edata, _sbss, _ebss, _estack;
extern int main(void);
extern void initialise_monitor_handles(void);
extern void _exit(int status);

volatile uint32_t nq_systick_wraps;

void Reset_Handler(void);
void Fault_Handler(void);
void SysTick_Handler(void);

void Fault_Handler(void)
{
    _exit(70);
}

void SysTick_Handler(void)
{
    nq_systick_wraps++;
}

__attribute__((section(".isr_vector"), used))
const void *const nq_vectors[16] = {
    &_estack, (const void *)Reset_Handler, (const void *)Fault_Handler,
    (const void *)Fault_Handler, (const void *)Fault_Handler, (const void *)Fault_Handler,
    (const void *)Fault_Handler, 0, 0, 0, 0, (const void *)Fault_Handler,
    (const void *)Fault_Handler, 0, (const void *)Fault_Handler, (const void *)SysTick_Handler,
};

void Reset_Handler(void)
{
    uint32_t *src = &_sidata, *dst;
    for (dst = &_sdata; dst < &_edata;)
        *dst++ = *src++;
    for (dst = &_sbss; dst < &_ebss;)
        *dst++ = 0;
    *(volatile uint32_t *)0xE000ED88u |= 0xFu << 20; /* CPACR: CP10, CP11 full access */
    __asm volatile("dsb\n\tisb");
    initialise_monitor_handles();
    _exit(main());
}
