# A float64 transcription of diffusers' UniPCMultistepScheduler.step (flow_prediction, predict_x0),
# plain floats instead of tensors. Prints the expected rows of
# unipc.rs::matches_diffusers_transcription_on_all_orders: `python3 unipc_toy.py`.
import math, struct, sys
def f32(x): return struct.unpack('f', struct.pack('f', x))[0]
def solve(A, b):
    n=len(b); A=[r[:] for r in A]; b=b[:]
    for c in range(n):
        p=max(range(c,n), key=lambda i: abs(A[i][c])); A[c],A[p]=A[p],A[c]; b[c],b[p]=b[p],b[c]
        for r in range(c+1,n):
            f=A[r][c]/A[c][c]
            for k in range(c,n): A[r][k]-=f*A[c][k]
            b[r]-=f*b[c]
    x=[0]*n
    for r in reversed(range(n)): x[r]=(b[r]-sum(A[r][k]*x[k] for k in range(r+1,n)))/A[r][r]
    return x
class UniPC:
    def __init__(s, n, order, solver_type, shift, final='zero', lof=True, disable=()):
        N=1000
        sig=[1+(1/N-1)*i/n for i in range(n)]
        sig=[shift*x/(1+(shift-1)*x) for x in sig]
        if abs(sig[0]-1)<1e-6: sig[0]-=1e-6
        s.timesteps=[int(x*N) for x in sig]
        last = sig[-1] if final=='sigma_min' else 0.0
        s.sigmas=[f32(x) for x in sig+[last]]
        s.order=order; s.bh=solver_type; s.lof=lof; s.disable=disable
        s.model_outputs=[None]*order; s.lower_order_nums=0; s.last_sample=None; s.step_index=0
    def at(s,g): return 1-g, g
    def lam(s,i):
        a,g=s.at(s.sigmas[i]); L=lambda v: math.log(v) if v>0 else -math.inf; return L(a)-L(g)
    def coeffs(s, h, rks, order):
        hh=-h; h_phi_1=math.expm1(hh); D=lambda a,b: a/b if b!=0 else math.nan; h_phi_k=D(h_phi_1,hh)-1; fac=1
        B_h = hh if s.bh=='bh1' else math.expm1(hh)
        R=[];b=[]
        for i in range(1,order+1):
            R.append([r**(i-1) for r in rks]); b.append(D(h_phi_k*fac,B_h)); fac*=i+1; h_phi_k=D(h_phi_k,hh)-1/fac
        return h_phi_1,B_h,R,b
    def uni_p(s, x, order):
        mol=s.model_outputs; m0=mol[-1]; k=s.step_index
        alpha_t,sigma_t=s.at(s.sigmas[k+1]); alpha_s0,sigma_s0=s.at(s.sigmas[k])
        lt=s.lam(k+1); ls0=s.lam(k); h=lt-ls0
        rks=[];D1s=[]
        for i in range(1,order):
            si=k-i; mi=mol[-(i+1)]; rk=(s.lam(si)-ls0)/h; rks.append(rk); D1s.append([(a-c)/rk for a,c in zip(mi,m0)])
        rks.append(1.0)
        h_phi_1,B_h,R,b=s.coeffs(h,rks,order)
        if D1s:
            rhos=[0.5] if order==2 else solve([r[:-1] for r in R[:-1]], b[:-1])
            pred=[sum(rhos[j]*D1s[j][e] for j in range(len(D1s))) for e in range(len(x))]
        else: pred=[0]*len(x)
        return [sigma_t/sigma_s0*xe - alpha_t*h_phi_1*me - (alpha_t*B_h*pe if D1s else 0) for xe,me,pe in zip(x,m0,pred)]
    def uni_c(s, mt, last, this, order):
        mol=s.model_outputs; m0=mol[-1]; k=s.step_index
        alpha_t,sigma_t=s.at(s.sigmas[k]); alpha_s0,sigma_s0=s.at(s.sigmas[k-1])
        lt=s.lam(k); ls0=s.lam(k-1); h=lt-ls0
        rks=[];D1s=[]
        for i in range(1,order):
            si=k-(i+1); mi=mol[-(i+1)]; rk=(s.lam(si)-ls0)/h; rks.append(rk); D1s.append([(a-c)/rk for a,c in zip(mi,m0)])
        rks.append(1.0)
        h_phi_1,B_h,R,b=s.coeffs(h,rks,order)
        rhos=[0.5] if order==1 else solve(R,b)
        out=[]
        for e in range(len(last)):
            corr=sum(rhos[j]*D1s[j][e] for j in range(len(D1s)))
            D1t=mt[e]-m0[e]
            out.append(sigma_t/sigma_s0*last[e]-alpha_t*h_phi_1*m0[e]-alpha_t*B_h*(corr+rhos[-1]*D1t))
        return out
    def step(s, mo, sample):
        k=s.step_index
        use_c = k>0 and (k-1) not in s.disable and s.last_sample is not None
        sig=s.sigmas[k]
        conv=[x-sig*m for x,m in zip(sample,mo)]
        if use_c: sample=s.uni_c(conv,s.last_sample,sample,s.this_order)
        s.model_outputs=s.model_outputs[1:]+[conv]
        o=min(s.order,len(s.timesteps)-k) if s.lof else s.order
        s.this_order=min(o,s.lower_order_nums+1)
        s.last_sample=sample
        prev=s.uni_p(sample,s.this_order)
        if s.lower_order_nums<s.order: s.lower_order_nums+=1
        s.step_index+=1
        return prev
# the toy model: Gaussian data N(0, 0.25), exact velocity, plus a nonlinear term so that
# every output history matters
def velocity(x, g):
    sd=0.5; var=(1-g)**2*sd*sd+g*g
    return [(g-(1-g)*sd*sd)/var*xe + 0.3*math.sin(3*xe+g) for xe in x]
if __name__=='__main__':
    for order in (1,2,3):
        for bh in ('bh1','bh2'):
            for final in ('zero','sigma_min'):
                for disable in ((), (1,)):
                    sc=UniPC(7,order,bh,3.0,final,True,disable)
                    x=[1.0,-0.5,2.0,0.1]
                    for i in range(7): x=sc.step(velocity(x,sc.sigmas[i]),x)
                    print(order,bh,final,len(disable),' '.join(repr(v) for v in x))
