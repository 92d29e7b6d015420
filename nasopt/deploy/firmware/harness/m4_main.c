/* Cortex-M4 test harness of a nasopt C export: reads samples.bin through semihosting (int32 n,
 * int32 size, n * size float32), prints one class per line, then '#' lines: the SysTick ticks
 * spent inside nasopt_predict, the ticks of a loop of known instruction count (to turn ticks
 * into instructions under qemu -icount), and the stack high-water mark of nasopt_predict
 * (stack painted below the caller's stack pointer). */
#include <stdint.h>
#include <stdio.h>
#include "model.h"

#define SYST_CSR (*(volatile uint32_t *)0xE000E010u)
#define SYST_RVR (*(volatile uint32_t *)0xE000E014u)
#define SYST_CVR (*(volatile uint32_t *)0xE000E018u)
#define PAINT 0xA5A5A5A5u
#define PAINT_WORDS 4096u
#define SPIN 1000000u

extern volatile uint32_t nq_systick_wraps;
static float x[NASOPT_INPUT_SIZE];

static uint64_t ticks(void)
{
    uint32_t w1, w2, v;
    do {
        w1 = nq_systick_wraps;
        v = SYST_CVR;
        w2 = nq_systick_wraps;
    } while (w1 != w2);
    return ((uint64_t)w1 << 24) | (0xFFFFFFu - v);
}

static void spin(uint32_t n)
{
    __asm volatile("1:\n\tsubs %0, %0, #1\n\tbne 1b" : "+r"(n) : : "cc");
}

int main(void)
{
    FILE *in = fopen("samples.bin", "rb");
    int32_t head[2], i;
    uint64_t spent = 0, t0, spin_ticks;
    uint32_t stack = 0;
    if (!in || fread(head, sizeof head, 1, in) != 1 || head[1] != NASOPT_INPUT_SIZE) {
        printf("#error cannot read samples.bin\n");
        return 2;
    }
    SYST_RVR = 0xFFFFFFu;
    SYST_CVR = 0u;
    SYST_CSR = 7u; /* enable, interrupt on wrap, processor clock */
    spin(64u);     /* the counter reloads from 0 to SYST_RVR on its first clock */
    t0 = ticks();
    spin(SPIN);
    spin_ticks = ticks() - t0;
    for (i = 0; i < head[0]; i++) {
        int cls;
        if (fread(x, sizeof x, 1, in) != 1) {
            printf("#error short samples.bin\n");
            return 3;
        }
        if (i < 4) { /* paint the stack below ours, run, find the lowest word written */
            uint32_t sp, k;
            volatile uint32_t *base;
            __asm volatile("mov %0, sp" : "=r"(sp));
            base = (volatile uint32_t *)(sp - 4u * PAINT_WORDS);
            for (k = 0; k < PAINT_WORDS - 8u; k++)
                base[k] = PAINT;
            t0 = ticks();
            cls = nasopt_predict(x);
            spent += ticks() - t0;
            for (k = 0; k < PAINT_WORDS - 8u && base[k] == PAINT; k++)
                ;
            if (sp - (uint32_t)(uintptr_t)&base[k] > stack)
                stack = sp - (uint32_t)(uintptr_t)&base[k];
        } else {
            t0 = ticks();
            cls = nasopt_predict(x);
            spent += ticks() - t0;
        }
        printf("%d\n", cls);
    }
    printf("#samples %ld\n#predict_ticks %lu %lu\n#spin %lu %lu\n#stack %lu\n", (long)head[0],
           (unsigned long)(spent >> 32), (unsigned long)(spent & 0xFFFFFFFFu),
           (unsigned long)(2u * SPIN), (unsigned long)spin_ticks, (unsigned long)stack);
    fclose(in);
    return 0;
}
